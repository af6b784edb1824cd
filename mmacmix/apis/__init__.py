"""Training, testing and launching helpers behind the tools/ scripts."""

from .dist import setup_distributed
from .hooks import (
    AtomicCheckpointHook,
    ExactResumeHook,
    FlushDenormalHook,
    add_project_hooks,
)
from .runner import (
    CheckedRunner,
    build_model,
    build_runner,
    check_checkpoint,
    load_config,
    test,
    train,
)

__all__ = [
    'AtomicCheckpointHook',
    'CheckedRunner',
    'ExactResumeHook',
    'FlushDenormalHook',
    'add_project_hooks',
    'build_model',
    'build_runner',
    'check_checkpoint',
    'load_config',
    'setup_distributed',
    'test',
    'train',
]
