"""ACmix and X-volution backbones for mmdet and mmsegmentation."""

from .version import __version__

__all__ = ['__version__']
