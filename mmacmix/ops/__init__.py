"""mmacmix's operators, one file each: ACmix's local attention, SAN's
patch aggregation and X-volution's pixel shift products, each a registered
op with C++ (CPU; local attention, pixel shift), Triton (CUDA; local
attention, patch aggregation) and PyTorch implementations."""

from .local_attention import (
    local_attention,
    native_available,
    triton_available,
)
from .patch_aggregation import patch_aggregation
from .pixel_shift import pixel_shift_attention, shift_products

__all__ = [
    'local_attention',
    'native_available',
    'patch_aggregation',
    'pixel_shift_attention',
    'shift_products',
    'triton_available',
]
