"""The end-to-end CPU demo: ``python -m mmacmix.demo``."""

import warnings

# MMEngine imports pkg_resources, which warns about its own deprecation
# at every start; the demo's console is for progress and results.
warnings.filterwarnings(
    'ignore', message='pkg_resources is deprecated', category=UserWarning
)

from .comparison import ComparisonResult, run_comparison  # noqa: E402
from .pipeline import (  # noqa: E402
    DEMO_SHAPES,
    TINY_SHAPES,
    DemoResult,
    run_demo,
)
from .pretrain import PretrainResult, pretrain_classifier  # noqa: E402

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
