"""SAN's patch aggregation: a per-pixel weighted sum over a sliding window.

The aggregation of SAN's patchwise self-attention (ACmix-SAN's attention
path) sums the ``k x k`` reflection-padded window of values around every
pixel with weights predicted per pixel, window offset and group of
channels, with no softmax. Nothing ``k^2``-fold is stored: both
implementations walk over the window offsets and keep only the inputs for
the backward pass.

The function is one registered operator, ``torch.ops.mmacmix.
patch_aggregation``, with ``torch.ops.mmacmix.patch_aggregation_backward``
as its registered autograd, so that ``torch.compile`` and tracers see one
node. Implementations, by device:

* CUDA: Triton kernels (``patch_aggregation_triton``), one program per
  tile of pixels streaming over the window, half precision accumulating in
  float32;
* any device, and on CUDA without triton: a PyTorch loop over the window
  offsets (one multiply-add of whole maps each).

An ONNX export gets the loop as plain operators.
"""

import functools
from types import ModuleType

import torch
from torch import Tensor

from .local_attention import fold_index
from .local_attention import triton_available as _local_triton_available

__all__ = ['patch_aggregation', 'reflection_pad', 'reflection_indices']

IMPLS = ('auto', 'triton', 'pytorch')


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """The Triton kernel module, imported on first use (None without
    triton). ``TRITON_INTERPRET`` is read at that import."""
    try:
        from . import patch_aggregation_triton
    except ImportError:
        return None
    return patch_aggregation_triton


def triton_available(device: torch.device | str = 'cuda') -> bool:
    """Whether the Triton kernels can run on tensors of ``device``: where
    the local attention's can (triton on CUDA, or its interpreter for CPU
    tensors) and these kernels import."""
    return _triton_kernels() is not None and _local_triton_available(device)


def reflection_indices(size: int, padding: int, device) -> Tensor:
    """Source position of every position of an axis padded by reflection
    (folded periodically, so ``padding`` may exceed the axis)."""
    positions = torch.arange(size + 2 * padding, device=device) - padding
    return fold_index(positions, size)


def reflection_pad(x: Tensor, padding: int) -> Tensor:
    """Pads the last two axes of ``x`` by reflection without edge repeat.

    Equals ``F.pad(x, [padding] * 4, mode='reflect')`` when ``padding`` is
    smaller than both sides, and is defined for any size.
    """
    rows = reflection_indices(x.shape[-2], padding, x.device)
    cols = reflection_indices(x.shape[-1], padding, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _windows(padded: Tensor, kernel_size: int, height: int, width: int):
    """Yields ``(t, view)`` for window offset ``t = ty * k + tx``: the
    ``height x width`` view of ``padded`` shifted by ``(ty, tx)``."""
    for t in range(kernel_size**2):
        ty, tx = divmod(t, kernel_size)
        yield t, padded[..., ty : ty + height, tx : tx + width]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aggregate(values: Tensor, weights: Tensor, kernel_size: int) -> Tensor:
    """The aggregation from plain operators, in the inputs' dtype.

    ``values`` is viewed as ``(B, S, G, H, W)``, so that channel ``s * G +
    g`` uses the weights of group ``g``.
    """
    b, _, height, width = values.shape
    groups = weights.shape[1]
    padded = reflection_pad(values, kernel_size // 2).unflatten(
        1, (-1, groups)
    )
    out = values.new_zeros(b, padded.shape[1], groups, height, width)
    for t, window in _windows(padded, kernel_size, height, width):
        out.addcmul_(window, weights[:, None, :, t])
    return out.flatten(1, 2)


def _pytorch_forward(
    values: Tensor, weights: Tensor, kernel_size: int
) -> Tensor:
    work = _work_dtype(values.dtype)
    return _aggregate(values.to(work), weights.to(work), kernel_size)


def _pytorch_backward(
    grad_out: Tensor, values: Tensor, weights: Tensor, kernel_size: int
) -> tuple[Tensor, Tensor]:
    work = _work_dtype(values.dtype)
    grad_out, values, weights = (
        x.to(work) for x in (grad_out, values, weights)
    )
    padding = kernel_size // 2
    b, channels, height, width = values.shape
    groups = weights.shape[1]
    rows = reflection_indices(height, padding, values.device)
    cols = reflection_indices(width, padding, values.device)
    padded = values.index_select(2, rows).index_select(3, cols)
    padded = padded.unflatten(1, (-1, groups))
    grad_out = grad_out.contiguous().unflatten(1, (-1, groups))
    grad_padded = torch.zeros_like(padded)
    grad_weights = torch.empty_like(weights)
    product = torch.empty_like(grad_out)
    windows = zip(
        _windows(padded, kernel_size, height, width),
        _windows(grad_padded, kernel_size, height, width),
    )
    for (t, window), (_, grad_window) in windows:
        torch.mul(grad_out, window, out=product)
        grad_weights[:, :, t] = product.sum(dim=1)
        grad_window.addcmul_(grad_out, weights[:, None, :, t])
    # Every padded position adds onto the position it was copied from.
    grad_padded = grad_padded.flatten(1, 2)
    by_rows = grad_padded.new_zeros(b, channels, height, cols.numel())
    by_rows.index_add_(2, rows, grad_padded)
    grad_values = by_rows.new_zeros(b, channels, height, width)
    grad_values.index_add_(3, cols, by_rows)
    return grad_values, grad_weights


def _triton_forward(values, weights, kernel_size):
    return _triton_kernels().forward(values, weights, kernel_size)


def _triton_backward(grad_out, values, weights, kernel_size):
    return _triton_kernels().backward(grad_out, values, weights, kernel_size)


_FORWARD = {'triton': _triton_forward, 'pytorch': _pytorch_forward}
_BACKWARD = {'triton': _triton_backward, 'pytorch': _pytorch_backward}


def _resolve(impl: str, device: torch.device) -> str:
    """The implementation that ``impl`` means for tensors on ``device``.

    Raises:
        RuntimeError: If a forced implementation cannot run there.
    """
    if impl == 'auto':
        if device.type == 'cuda' and triton_available('cuda'):
            return 'triton'
        return 'pytorch'
    if impl == 'triton' and not triton_available(device):
        raise RuntimeError(
            'the Triton patch aggregation needs triton and CUDA tensors, or '
            'CPU tensors with TRITON_INTERPRET=1 set before mmacmix first '
            f'ran it; got {device.type} tensors, triton '
            f'{"present" if _triton_kernels() else "not installed"}'
        )
    return impl


@torch.library.custom_op('mmacmix::patch_aggregation', mutates_args=())
def _forward_op(
    values: Tensor, weights: Tensor, kernel_size: int, impl: str
) -> Tensor:
    """``(B, C, H, W)`` in the dtype of ``values``."""
    out = _FORWARD[_resolve(impl, values.device)](values, weights, kernel_size)
    return out.to(values.dtype)


@_forward_op.register_fake
def _(values, weights, kernel_size, impl):
    return torch.empty_like(values)


@torch.library.custom_op(
    'mmacmix::patch_aggregation_backward', mutates_args=()
)
def _backward_op(
    grad_out: Tensor,
    values: Tensor,
    weights: Tensor,
    kernel_size: int,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """Gradients of values and weights, each in its input's dtype."""
    grad_values, grad_weights = _BACKWARD[_resolve(impl, values.device)](
        grad_out, values, weights, kernel_size
    )
    return grad_values.to(values.dtype), grad_weights.to(weights.dtype)


@_backward_op.register_fake
def _(grad_out, values, weights, kernel_size, impl):
    return torch.empty_like(values), torch.empty_like(weights)


def _setup_context(ctx, inputs, output) -> None:
    values, weights, kernel_size, impl = inputs
    ctx.save_for_backward(values, weights)
    ctx.geometry = (kernel_size, impl)


def _backward(ctx, grad_out: Tensor):
    values, weights = ctx.saved_tensors
    grads = _backward_op(grad_out, values, weights, *ctx.geometry)
    return (*grads, None, None)


torch.library.register_autograd(
    'mmacmix::patch_aggregation', _backward, setup_context=_setup_context
)


def patch_aggregation(
    values: Tensor,
    weights: Tensor,
    kernel_size: int,
    *,
    impl: str = 'auto',
) -> Tensor:
    """SAN's aggregation: a per-pixel weighted sum over a ``k x k`` window.

    ``out[:, c, i, j] = sum_t weights[:, c % G, t, i, j] * v_t`` where
    ``v_t`` is ``values[:, c]`` at ``(i + ty - p, j + tx - p)``,
    ``t = ty * k + tx``, ``p = k // 2``, reflected at the borders (folded
    periodically for maps smaller than the window). No normalisation.

    Args:
        values (Tensor): ``(B, C, H, W)``.
        weights (Tensor): ``(B, G, k^2, H, W)``; ``G`` divides ``C``. Cast
            to the dtype of ``values``.
        kernel_size (int): Odd window side ``k``.
        impl (str): ``'auto'`` runs the Triton kernels on CUDA tensors and
            the PyTorch loop elsewhere (or without triton). ``'triton'``
            and ``'pytorch'`` force one; ``'triton'`` also runs CPU tensors
            in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
            before mmacmix first used it (for tests without a GPU).
            Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C, H, W)`` in the dtype of ``values``; float16 and
        bfloat16 inputs are summed in float32.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if (
        not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            f'kernel_size must be an odd integer >= 1, got {kernel_size!r}'
        )
    if values.dim() != 4 or weights.dim() != 5:
        raise ValueError(
            'values must be (B, C, H, W) and weights (B, G, k^2, H, W), got '
            f'{tuple(values.shape)} and {tuple(weights.shape)}'
        )
    if values.device != weights.device:
        raise ValueError('values and weights must be on the same device')
    if not (values.is_floating_point() and weights.is_floating_point()):
        raise TypeError(
            f'floating-point inputs expected, got {values.dtype} and '
            f'{weights.dtype}'
        )
    b, channels, height, width = values.shape
    groups = weights.shape[1]
    if weights.shape != (b, groups, kernel_size**2, height, width) or (
        channels % groups
    ):
        raise ValueError(
            f'weights of shape (B, G, {kernel_size**2}, H, W) with G '
            f'dividing the {channels} channels of values '
            f'{tuple(values.shape)} expected, got {tuple(weights.shape)}'
        )
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        # Raises early, with the reason, for a forced impl that cannot run.
        _resolve(impl, values.device)
    weights = weights.to(values.dtype)
    if torch.onnx.is_in_onnx_export():
        work = _work_dtype(values.dtype)
        out = _aggregate(values.to(work), weights.to(work), kernel_size)
        return out.to(values.dtype)
    return _forward_op(values, weights, kernel_size, impl)
