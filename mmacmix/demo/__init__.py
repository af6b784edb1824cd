"""The end-to-end CPU demo: ``python -m mmacmix.demo``."""

import warnings

# MMEngine imports pkg_resources, which warns about its own deprecation
# at every start; the demo's console is for progress and results.
warnings.filterwarnings(
    'ignore', message='pkg_resources is deprecated', category=UserWarning
)

from .pipeline import (  # noqa: E402
    DEMO_SHAPES,
    TINY_SHAPES,
    DemoResult,
    run_demo,
)

__all__ = ['DEMO_SHAPES', 'TINY_SHAPES', 'DemoResult', 'run_demo']
