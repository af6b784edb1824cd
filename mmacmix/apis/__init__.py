"""Training, testing and launching helpers behind the tools/ scripts."""

from .dist import setup_distributed
from .hooks import AtomicCheckpointHook, ExactResumeHook
from .runner import (
    allow_full_checkpoint_loading,
    build_runner,
    check_checkpoint,
    load_config,
    test,
    train,
)

__all__ = [
    'AtomicCheckpointHook',
    'ExactResumeHook',
    'allow_full_checkpoint_loading',
    'build_runner',
    'check_checkpoint',
    'load_config',
    'setup_distributed',
    'test',
    'train',
]
