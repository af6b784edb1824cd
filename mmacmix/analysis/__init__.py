"""Model analysis: parameter and FLOP counts."""

from .flops import (
    analyse,
    build_backbone,
    build_from_config,
    official_form,
)

__all__ = ['analyse', 'build_backbone', 'build_from_config', 'official_form']
