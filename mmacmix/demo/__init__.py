"""The end-to-end CPU demo: ``python -m mmacmix.demo``."""

from .comparison import ComparisonResult, run_comparison
from .pipeline import (
    DEMO_SHAPES,
    TINY_SHAPES,
    DemoResult,
    run_demo,
)
from .pretrain import PretrainResult, pretrain_classifier

__all__ = [
    'DEMO_SHAPES',
    'TINY_SHAPES',
    'ComparisonResult',
    'DemoResult',
    'PretrainResult',
    'pretrain_classifier',
    'run_comparison',
    'run_demo',
]
