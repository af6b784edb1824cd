"""Shared fixtures: a tiny synthetic dataset and quiet, fast CPU settings."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from mmacmix.datasets import ShapesSpec, generate_shapes_dataset

# Randomly initialised detectors hit denormal floats, which are very slow on
# CPU; flushing them changes no result that a test checks.
torch.set_flush_denormal(True)

# pyproject's addopts run the suite on every core (pytest-xdist, -n auto):
# each worker takes its share of the cores instead of all of them.
_workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _workers > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

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


@pytest.fixture(scope='session')
def imagenet_root(shapes_root: str, tmp_path_factory) -> str:
    """The shape images in ImageNet layout (``meta/{split}.txt`` lists
    ``image label``), two classes."""
    root = tmp_path_factory.mktemp('imagenet')
    (root / 'meta').mkdir()
    for split in ('train', 'val'):
        images = sorted(Path(shapes_root, 'coco', split).glob('*.jpg'))
        (root / split).mkdir()
        lines = []
        for label, image in enumerate(images):
            (root / split / image.name).write_bytes(image.read_bytes())
            lines.append(f'{image.name} {label % 2}\n')
        (root / 'meta' / f'{split}.txt').write_text(''.join(lines))
    return str(root)
