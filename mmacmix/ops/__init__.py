"""Local attention: one registered op with C++ (CPU), Triton (CUDA) and
PyTorch implementations."""

from .local_attention import (
    local_attention,
    native_available,
    triton_available,
)

__all__ = ['local_attention', 'native_available', 'triton_available']
