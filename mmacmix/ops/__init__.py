"""mmacmix's operators, one file each: ACmix's local attention and
X-volution's pixel shift products, each a registered op with C++ (CPU),
Triton (CUDA, local attention) and PyTorch implementations."""

from .local_attention import (
    local_attention,
    native_available,
    triton_available,
)
from .pixel_shift import pixel_shift_attention, shift_products

__all__ = [
    'local_attention',
    'native_available',
    'pixel_shift_attention',
    'shift_products',
    'triton_available',
]
