"""Operators with compiled CPU kernels and PyTorch fallbacks."""

from .local_attention import local_attention, native_available

__all__ = ['local_attention', 'native_available']
