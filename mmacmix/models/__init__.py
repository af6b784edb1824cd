"""Backbones and operators, registered in :data:`mmacmix.registry.MODELS`."""

from .acmix import ACmix, ACmixBase
from .acmix_pvt import ACmixPVT
from .acmix_resnet import ACmixResNet
from .acmix_san import ACmixSAN
from .acmix_swin import ACmixSwinTransformer
from .converters import (
    convert_acmix_resnet,
    convert_acmix_swin,
    convert_pvt_to_acmix,
    convert_resnet_to_xvolution,
)
from .xvolution import XVolution
from .xvolution_resnet import XVolutionResNet

__all__ = [
    'ACmix',
    'ACmixBase',
    'ACmixPVT',
    'ACmixResNet',
    'ACmixSAN',
    'ACmixSwinTransformer',
    'convert_acmix_resnet',
    'convert_acmix_swin',
    'convert_pvt_to_acmix',
    'XVolution',
    'XVolutionResNet',
    'convert_resnet_to_xvolution',
]
