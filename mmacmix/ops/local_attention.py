"""Sliding-window local attention, the attention path of ACmix-ResNet.

Every output pixel attends to a ``kernel_size x kernel_size`` window of keys
and values centred on it (on ``stride * (i, j)`` for a strided op), with the
map extended by reflection.  The official code gathers the windows with
``unfold``, which stores ``kernel_size ** 2`` copies of the keys and values
(gigabytes for one stage-1 op of a detection-sized image).  Here nothing
``kernel_size ** 2``-fold is kept.

The function is one registered operator, ``torch.ops.mmacmix.
local_attention`` (forward, returning the output and a per-pixel
log-sum-exp) with ``torch.ops.mmacmix.local_attention_backward`` as its
registered autograd, so that ``torch.compile`` and tracers see one node.
Implementations, by device:

* CPU: a compiled C++ kernel (``mmacmix.ops._ext``), which streams over the
  windows on PyTorch's thread pool;
* CUDA: Triton kernels (``local_attention_triton``), half precision
  included, accumulating in float32;
* any device, and wherever those are missing: a PyTorch loop that gathers
  one window row (``kernel_size`` copies) at a time.

All keep only the inputs and the log-sum-exp for the backward pass and
recompute the attention weights there.  An ONNX export gets a graph of
plain operators whose gathers follow the traced sizes, so one exported model
serves any input size.
"""

import functools
from types import ModuleType

import torch
from torch import Tensor

from . import native
from .native import IMPORT_ERROR as _EXT_ERROR
from .native import ext as _ext

__all__ = [
    'local_attention',
    'native_available',
    'triton_available',
]

IMPLS = ('auto', 'native', 'triton', 'pytorch')


def native_available() -> bool:
    """Whether the compiled CPU kernel could be imported."""
    return _ext is not None


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """The Triton kernel module, imported on first use (None without
    triton).  ``TRITON_INTERPRET`` is read at that import."""
    try:
        from . import local_attention_triton
    except ImportError:
        return None
    return local_attention_triton


def triton_available(device: torch.device | str = 'cuda') -> bool:
    """Whether the Triton kernels can run on tensors of ``device``.

    On CUDA this needs triton; on the CPU it also needs
    ``TRITON_INTERPRET=1`` set before the kernels were first used.
    """
    kernels = _triton_kernels()
    if kernels is None:
        return False
    device_type = torch.device(device).type
    return device_type == 'cuda' or (
        device_type == 'cpu' and kernels.INTERPRETED
    )


def fold_index(index: Tensor, size: int) -> Tensor:
    """Maps any integer positions into ``[0, size)`` by reflection.

    The reflection does not repeat the edge (like ``ReflectionPad2d``) and is
    extended periodically, so it is defined for pads wider than the map.

    Args:
        index (Tensor): Integer positions, any shape.
        size (int): Length of the axis (a 0-d tensor while tracing).

    Returns:
        Tensor: The folded positions, same shape.
    """
    # Branch-free, so that an exporter traces it for any size: a size of 1
    # gives period 1 and every position 0.  While tracing, sizes are 0-d
    # tensors.
    if isinstance(size, int):
        period = max(2 * (size - 1), 1)
    else:
        period = torch.clamp(2 * (size - 1), min=1)
    index = torch.remainder(index, period)
    return torch.where(index < size, index, period - index)


class _WindowRows:
    """Gathers window row ``ty`` of every output pixel at once.

    ``gather(x, ty)`` is ``(N, D, Ho, kernel_size, Wo)``: entry
    ``[..., i, tx, j]`` is ``x`` at window offset ``(ty, tx)`` of output
    pixel ``(i, j)``.  Index tensors come from the (possibly traced) sizes,
    so an exported graph serves any input size.
    """

    def __init__(self, q: Tensor, k: Tensor, kernel_size: int, stride: int):
        ho, wo = q.shape[-2:]
        taps = torch.arange(kernel_size, device=q.device) - kernel_size // 2
        rows = torch.arange(ho, device=q.device) * stride
        cols = torch.arange(wo, device=q.device) * stride
        self.kernel_size = kernel_size
        self.rows = fold_index(taps[:, None] + rows, k.shape[2])
        self.cols = fold_index((taps[:, None] + cols).flatten(), k.shape[3])

    def gather(self, x: Tensor, ty: int) -> Tensor:
        x = x.index_select(2, self.rows[ty]).index_select(3, self.cols)
        return x.unflatten(3, (self.kernel_size, -1))

    def scatter_add_(self, grad: Tensor, window: Tensor, ty: int) -> None:
        """Adds the gradient of ``gather(x, ty)`` onto ``grad``."""
        by_columns = grad.new_zeros(*window.shape[:3], grad.shape[3])
        by_columns.index_add_(3, self.cols, window.flatten(3))
        grad.index_add_(2, self.rows[ty], by_columns)


def _window_logits(x: Tensor, windows: _WindowRows, source: Tensor) -> Tensor:
    """``x . source`` for every window offset: ``(N, Ho, k ** 2, Wo)``."""
    return torch.cat(
        [
            (x.unsqueeze(3) * windows.gather(source, ty)).sum(1)
            for ty in range(windows.kernel_size)
        ],
        dim=2,
    )


def _weighted_sum(
    weights: Tensor, windows: _WindowRows, source: Tensor
) -> Tensor:
    """``sum_t weights_t * source_t``: ``(N, D, Ho, Wo)``."""
    k = windows.kernel_size
    out = 0
    for ty in range(k):
        row = weights[:, None, :, ty * k : (ty + 1) * k]
        out = out + (row * windows.gather(source, ty)).sum(3)
    return out


def _local_attention_graph(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> Tensor:
    """Plain operators only, for ONNX export.

    Each window row of all pixels is gathered at once: a few operators per
    row, not per offset, so the graph grows with ``kernel_size``, not with
    its square, and at most ``kernel_size`` copies of the keys or values
    exist at a time.  Inference only.
    """
    windows = _WindowRows(q, k, kernel_size, stride)
    probs = _window_logits(q, windows, k).softmax(dim=2)
    return _weighted_sum(probs, windows, v)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pytorch_forward(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    work = _work_dtype(q.dtype)
    q, k, v = (x.to(work) for x in (q, k, v))
    windows = _WindowRows(q, k, kernel_size, stride)
    logits = _window_logits(q, windows, k)
    lse = torch.logsumexp(logits, dim=2, keepdim=True)
    out = _weighted_sum(logits.sub_(lse).exp_(), windows, v)
    return out, lse.squeeze(2)


def _pytorch_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    kernel_size: int,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    work = _work_dtype(q.dtype)
    grad_out, q, k, v = (x.to(work) for x in (grad_out, q, k, v))
    windows = _WindowRows(q, k, kernel_size, stride)
    probs = _window_logits(q, windows, k).sub_(lse.unsqueeze(2)).exp_()
    # d(loss)/d(prob_t) = grad_out . v_t, then the softmax Jacobian.
    grad_logits = _window_logits(grad_out, windows, v)
    delta = (probs * grad_logits).sum(dim=2, keepdim=True)
    grad_logits.sub_(delta).mul_(probs)
    grad_q = _weighted_sum(grad_logits, windows, k)
    grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
    for ty in range(kernel_size):
        taps = slice(ty * kernel_size, (ty + 1) * kernel_size)
        windows.scatter_add_(
            grad_k, grad_logits[:, None, :, taps] * q.unsqueeze(3), ty
        )
        windows.scatter_add_(
            grad_v, probs[:, None, :, taps] * grad_out.unsqueeze(3), ty
        )
    return grad_q, grad_k, grad_v


def _native_forward(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    work = _work_dtype(q.dtype)
    q, k, v = (x.to(work).contiguous() for x in (q, k, v))
    return tuple(_ext.local_attention_forward(q, k, v, kernel_size, stride))


def _native_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    kernel_size: int,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    work = _work_dtype(q.dtype)
    grad_out, q, k, v = (x.to(work).contiguous() for x in (grad_out, q, k, v))
    return tuple(
        _ext.local_attention_backward(
            grad_out, q, k, v, lse, kernel_size, stride
        )
    )


def _triton_forward(q, k, v, kernel_size, stride):
    return _triton_kernels().forward(q, k, v, kernel_size, stride)


def _triton_backward(grad_out, q, k, v, lse, kernel_size, stride):
    return _triton_kernels().backward(
        grad_out, q, k, v, lse, kernel_size, stride
    )


_FORWARD = {
    'native': _native_forward,
    'triton': _triton_forward,
    'pytorch': _pytorch_forward,
}
_BACKWARD = {
    'native': _native_backward,
    'triton': _triton_backward,
    'pytorch': _pytorch_backward,
}


def _resolve(impl: str, device: torch.device) -> str:
    """The implementation that ``impl`` means for tensors on ``device``.

    Raises:
        RuntimeError: If a forced implementation cannot run there.
    """
    if impl == 'auto':
        if device.type == 'cpu' and _ext is not None:
            return 'native'
        if device.type == 'cuda' and triton_available('cuda'):
            return 'triton'
        return 'pytorch'
    if impl == 'native' and (_ext is None or device.type != 'cpu'):
        raise RuntimeError(
            'the compiled local attention needs CPU tensors and a build of '
            f'mmacmix with its extension ({_EXT_ERROR or "CPU only"})'
        )
    if impl == 'triton' and not triton_available(device):
        raise RuntimeError(
            'the Triton local attention needs triton and CUDA tensors, or '
            'CPU tensors with TRITON_INTERPRET=1 set before mmacmix first '
            f'ran it; got {device.type} tensors, triton '
            f'{"present" if _triton_kernels() else "not installed"}'
        )
    return impl


@torch.library.custom_op('mmacmix::local_attention', mutates_args=())
def _forward_op(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int, impl: str
) -> tuple[Tensor, Tensor]:
    """Output ``(N, D, Ho, Wo)`` in q's dtype and the log-sum-exp ``(N, Ho,
    Wo)`` of the logits, in float32 (float64 for float64 inputs)."""
    resolved = _resolve(impl, q.device)
    if impl == 'auto' and resolved == 'pytorch' and q.device.type == 'cpu':
        # Warned here, at dispatch, not in the caller: the op's body runs
        # eagerly even under torch.compile, which would otherwise have to
        # trace the module-level flag and break the graph.
        native.warn_fallback_once('local attention')
    out, lse = _FORWARD[resolved](q, k, v, kernel_size, stride)
    return out.to(q.dtype), lse


@_forward_op.register_fake
def _(q, k, v, kernel_size, stride, impl):
    lse_shape = (q.shape[0], *q.shape[2:])
    return torch.empty_like(q), q.new_empty(
        lse_shape, dtype=_work_dtype(q.dtype)
    )


@torch.library.custom_op('mmacmix::local_attention_backward', mutates_args=())
def _backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    kernel_size: int,
    stride: int,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v, each in its input's dtype."""
    grads = _BACKWARD[_resolve(impl, q.device)](
        grad_out, q, k, v, lse, kernel_size, stride
    )
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))


@_backward_op.register_fake
def _(grad_out, q, k, v, lse, kernel_size, stride, impl):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kernel_size, stride, impl = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.geometry = (kernel_size, stride, impl)


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor):
    # The log-sum-exp is an internal output: nothing differentiates it.
    q, k, v, lse = ctx.saved_tensors
    grads = _backward_op(grad_out, q, k, v, lse, *ctx.geometry)
    return (*grads, None, None, None)


torch.library.register_autograd(
    'mmacmix::local_attention', _backward, setup_context=_setup_context
)


def _check(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> None:
    if (
        not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            f'kernel_size must be an odd integer >= 1, got {kernel_size!r}'
        )
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f'stride must be an integer >= 1, got {stride!r}')
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError('q, k and v must be 4-d (N, D, H, W) tensors')
    if k.shape != v.shape:
        raise ValueError(
            f'k and v must have the same shape, got {tuple(k.shape)} and '
            f'{tuple(v.shape)}'
        )
    n, d, h, w = k.shape
    if h < 1 or w < 1:
        raise ValueError(f'empty feature map {tuple(k.shape)}')
    expected = (n, d, -(-h // stride), -(-w // stride))
    if tuple(q.shape) != expected:
        raise ValueError(
            f'q must have shape {expected} for k of shape {tuple(k.shape)} '
            f'and stride {stride}, got {tuple(q.shape)}'
        )
    if not (q.device == k.device == v.device):
        raise ValueError('q, k and v must be on the same device')
    for x in (q, k, v):
        if not x.is_floating_point():
            raise TypeError(f'floating-point inputs expected, got {x.dtype}')


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int = 7,
    stride: int = 1,
    *,
    impl: str = 'auto',
) -> Tensor:
    """Softmax attention of each pixel over its sliding window.

    ``out[n, :, i, j] = sum_t a_t * v[n, :, y_t, x_t]`` where ``a`` is the
    softmax over the ``kernel_size ** 2`` window offsets
    ``t = (dy + p) * kernel_size + (dx + p)`` (``p = kernel_size // 2``) of
    ``q[n, :, i, j] . k[n, :, y_t, x_t]``, with ``y_t = R_H(stride * i + dy)``
    and ``x_t = R_W(stride * j + dx)``.  ``R`` is reflection without edge
    repeat, folded periodically for windows wider than the map, so it equals
    ``F.pad(..., mode='reflect')`` whenever ``p < H`` and ``p < W``.

    Args:
        q (Tensor): Queries, already scaled, ``(N, D, Ho, Wo)`` with
            ``Ho = ceil(H / stride)`` and ``Wo = ceil(W / stride)``.
        k (Tensor): Keys, ``(N, D, H, W)``.
        v (Tensor): Values, ``(N, D, H, W)``.
        kernel_size (int): Odd window size. Defaults to 7.
        stride (int): Step between window centres. Defaults to 1.
        impl (str): ``'auto'`` runs the compiled kernel on CPU tensors, the
            Triton kernels on CUDA tensors, and the PyTorch loop elsewhere
            or when those are missing. ``'native'``, ``'triton'`` and
            ``'pytorch'`` force one; ``'triton'`` also runs CPU tensors in
            Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
            mmacmix first used it (for tests without a GPU).
            Defaults to ``'auto'``.

    Returns:
        Tensor: ``(N, D, Ho, Wo)``, in the dtype of ``q`` (k and v are cast
        to it).  float64 is computed in float64, every other floating dtype
        with float32 accumulation.
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if not torch.jit.is_tracing():  # traced sizes cannot be compared
        _check(q, k, v, kernel_size, stride)
    if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
        # Raises early, with the reason, for a forced impl that cannot run.
        _resolve(impl, q.device)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if torch.onnx.is_in_onnx_export():
        work = _work_dtype(q.dtype)
        out = _local_attention_graph(
            q.to(work), k.to(work), v.to(work), kernel_size, stride
        )
        return out.to(q.dtype)
    out, _ = _forward_op(q, k, v, kernel_size, stride, impl)
    return out
