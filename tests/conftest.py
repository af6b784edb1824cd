"""Shared fixtures: a tiny synthetic dataset and quiet, fast CPU settings."""

import os

import pytest
import torch
from hypothesis import settings

from mmacmix.datasets import ShapesSpec, generate_shapes_dataset

# Randomly initialised detectors hit denormal floats, which are very slow on
# CPU; flushing them changes no result that a test checks.
torch.set_flush_denormal(True)

# In CI the property tests draw the same examples on every run, so a red
# build is never a coin toss; locally they keep exploring new ones.
settings.register_profile('ci', derandomize=True, print_blob=True)
if os.environ.get('CI', '').lower() == 'true':
    settings.load_profile('ci')

TINY_SHAPES = ShapesSpec(
    num_train=4, num_val=2, image_size=(128, 128), max_instances=3, seed=0
)


@pytest.fixture(scope='session')
def shapes_root(tmp_path_factory) -> str:
    """A tiny shapes dataset in COCO and ADE20K layouts."""
    root = tmp_path_factory.mktemp('data') / 'shapes'
    return generate_shapes_dataset(str(root), TINY_SHAPES)
