"""The mmacmix model registry.

A child of MMEngine's root ``MODELS`` registry: mmdet and mmseg configs reach
our classes as ``type='mmacmix.ACmixResNet'`` without either package knowing
about us, and ``locations`` imports the models on first use.
"""

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model',
    parent=MMENGINE_MODELS,
    scope='mmacmix',
    locations=['mmacmix.models'],
)
