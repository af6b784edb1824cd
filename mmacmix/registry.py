"""The mmacmix registries.

Children of MMEngine's root registries: mmdet and mmseg configs reach our
classes as ``type='mmacmix.ACmixResNet'`` (models) or
``type='mmacmix.ExactResumeHook'`` (hooks) without either package knowing
about us, and ``locations`` imports the classes on first use.
"""

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

MODELS = Registry(
    'model',
    parent=MMENGINE_MODELS,
    scope='mmacmix',
    locations=['mmacmix.models'],
)
HOOKS = Registry(
    'hook',
    parent=MMENGINE_HOOKS,
    scope='mmacmix',
    locations=['mmacmix.apis.hooks'],
)
