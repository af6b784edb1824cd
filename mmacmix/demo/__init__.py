"""The end-to-end CPU demo: ``python -m mmacmix.demo``."""

from .pipeline import DEMO_SHAPES, TINY_SHAPES, DemoResult, run_demo

__all__ = ['DEMO_SHAPES', 'TINY_SHAPES', 'DemoResult', 'run_demo']
