"""Backbones and operators, registered in :data:`mmacmix.registry.MODELS`."""

from .acmix import ACmix, ACmixBase
from .acmix_resnet import ACmixResNet, convert_acmix_resnet
from .acmix_swin import ACmixSwinTransformer, convert_acmix_swin
from .xvolution import (
    XVolution,
    XVolutionResNet,
    convert_resnet_to_xvolution,
)

__all__ = [
    'ACmix',
    'ACmixBase',
    'ACmixResNet',
    'ACmixSwinTransformer',
    'convert_acmix_resnet',
    'convert_acmix_swin',
    'XVolution',
    'XVolutionResNet',
    'convert_resnet_to_xvolution',
]
