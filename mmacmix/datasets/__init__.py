"""Synthetic data for demos and tests (no download needed)."""

from .synthetic import SHAPE_CLASSES, ShapesSpec, generate_shapes_dataset

__all__ = ['SHAPE_CLASSES', 'ShapesSpec', 'generate_shapes_dataset']
