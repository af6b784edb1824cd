"""Synthetic data for demos and tests (no download needed)."""

from .crops import crop_box, generate_shape_crops
from .synthetic import SHAPE_CLASSES, ShapesSpec, generate_shapes_dataset

__all__ = [
    'SHAPE_CLASSES',
    'ShapesSpec',
    'crop_box',
    'generate_shape_crops',
    'generate_shapes_dataset',
]
