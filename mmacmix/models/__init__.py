"""Backbones and operators, registered in :data:`mmacmix.registry.MODELS`."""

from .acmix import ACmix, ACmixBase
from .acmix_resnet import ACmixResNet, convert_acmix_resnet

__all__ = ['ACmix', 'ACmixBase', 'ACmixResNet', 'convert_acmix_resnet']
