"""Sliding-window local attention, the attention path of ACmix-ResNet.

Every output pixel attends to a ``kernel_size x kernel_size`` window of keys
and values centred on it (on ``stride * (i, j)`` for a strided op), with the
map extended by reflection.  The official code gathers the windows with
``unfold``, which stores ``kernel_size ** 2`` copies of the keys and values
(3.3 GB for one stage-1 op of an 800 x 1216 image).  Here no
``kernel_size ** 2``-fold tensor is ever kept: on the CPU a compiled kernel
(``mmacmix.ops._ext``) streams over the windows, and elsewhere (CUDA, or a
build without the extension) a PyTorch loop over the window offsets does.
Both keep only the inputs and a per-pixel log-sum-exp for the backward pass
and recompute the attention weights there.  An ONNX export gets a graph of
plain operators whose gathers follow the traced sizes, so one exported model
serves any input size.
"""

import warnings

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

try:
    from . import _ext
except ImportError as error:  # built without the extension
    _ext = None
    _EXT_ERROR: ImportError | None = error
else:
    _EXT_ERROR = None

__all__ = ['local_attention', 'native_available']

_IMPLS = ('auto', 'native', 'pytorch')
_warned_fallback = False


def native_available() -> bool:
    """Whether the compiled CPU kernel could be imported."""
    return _ext is not None


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


def _padded_sources(
    size: int, out_size: int, kernel_size: int, stride: int, device
) -> Tensor:
    """Input position of every position of the reflection-padded axis.

    Only integer arithmetic on the sizes, which a tracer keeps in the graph.
    """
    padded = stride * (out_size - 1) + kernel_size
    positions = torch.arange(padded, device=device) - kernel_size // 2
    return fold_index(positions, size)


def _window(
    padded: Tensor, ty: int, tx: int, out_hw: tuple[int, int], stride: int
) -> Tensor:
    """View of window offset ``(ty, tx)`` for all output pixels."""
    ho, wo = out_hw
    return padded[
        :,
        :,
        ty : ty + stride * (ho - 1) + 1 : stride,
        tx : tx + stride * (wo - 1) + 1 : stride,
    ]


def _logits(
    q: Tensor, key_padded: Tensor, kernel_size: int, stride: int
) -> Tensor:
    """Attention logits, ``(N, kernel_size ** 2, Ho, Wo)``."""
    n, _, ho, wo = q.shape
    logits = q.new_empty(n, kernel_size**2, ho, wo)
    # One (N, D, Ho, Wo) product buffer for all offsets, instead of a
    # kernel_size ** 2-fold tensor or a fresh temporary per offset.
    product = torch.empty_like(q)
    for t in range(kernel_size**2):
        window = _window(
            key_padded, t // kernel_size, t % kernel_size, (ho, wo), stride
        )
        torch.mul(q, window, out=product)
        torch.sum(product, dim=1, out=logits[:, t])
    return logits


def _local_attention_graph(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> Tensor:
    """Plain operators only, for ONNX export.

    Index tensors are built from the traced sizes, so the exported graph
    serves any input size.  Each window row of all pixels is gathered at
    once (``(N, D, Ho, kernel_size, Wo)``): a few operators per row, not per
    offset, so an ACmix-ResNet-26 graph has about 4.7k nodes instead of 12k
    (export 6 s instead of 40 s, onnxruntime session start 2.5 s instead of
    18 s), and at most ``kernel_size`` copies of the keys or values exist
    at a time.  Inference only.
    """
    ho, wo = q.shape[-2:]
    taps = torch.arange(kernel_size, device=q.device) - kernel_size // 2
    rows = torch.arange(ho, device=q.device) * stride
    cols = torch.arange(wo, device=q.device) * stride
    rows = fold_index(taps[:, None] + rows, k.shape[2])  # (row tap, Ho)
    cols = fold_index((taps[:, None] + cols).flatten(), k.shape[3])

    def window_row(x: Tensor, ty: int) -> Tensor:
        x = x.index_select(2, rows[ty]).index_select(3, cols)
        return x.unflatten(3, (kernel_size, -1))

    # Offset t = ty * kernel_size + tx, as in the kernel.
    logits = torch.cat(
        [
            (q.unsqueeze(3) * window_row(k, ty)).sum(1)
            for ty in range(kernel_size)
        ],
        dim=2,
    )
    probs = logits.softmax(dim=2).unsqueeze(1)  # (N, 1, Ho, k ** 2, Wo)
    out = 0
    for ty in range(kernel_size):
        weights = probs[:, :, :, ty * kernel_size : (ty + 1) * kernel_size]
        out = out + (weights * window_row(v, ty)).sum(3)
    return out


class _LocalAttentionLoop(Function):
    """Any-device implementation looping over the window offsets."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
    ) -> Tensor:
        ho, wo = q.shape[-2:]
        rows = _padded_sources(k.shape[2], ho, kernel_size, stride, q.device)
        cols = _padded_sources(k.shape[3], wo, kernel_size, stride, q.device)
        key_padded = k.index_select(2, rows).index_select(3, cols)
        logits = _logits(q, key_padded, kernel_size, stride)
        del key_padded
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        probs = torch.exp(logits.sub_(lse))
        value_padded = v.index_select(2, rows).index_select(3, cols)
        out = torch.zeros_like(q)
        for t in range(kernel_size**2):
            window = _window(
                value_padded,
                t // kernel_size,
                t % kernel_size,
                (ho, wo),
                stride,
            )
            out.addcmul_(probs[:, t : t + 1], window)
        ctx.save_for_backward(q, k, v, lse)
        ctx.geometry = (kernel_size, stride)
        return out

    @staticmethod
    @once_differentiable  # double backward raises instead of returning 0
    def backward(ctx, grad_out: Tensor):
        q, k, v, lse = ctx.saved_tensors
        kernel_size, stride = ctx.geometry
        grad_out = grad_out.contiguous()
        n, d, h, w = k.shape
        ho, wo = q.shape[-2:]
        rows = _padded_sources(h, ho, kernel_size, stride, q.device)
        cols = _padded_sources(w, wo, kernel_size, stride, q.device)
        key_padded = k.index_select(2, rows).index_select(3, cols)
        value_padded = v.index_select(2, rows).index_select(3, cols)
        probs = _logits(q, key_padded, kernel_size, stride).sub_(lse).exp_()
        # d(loss)/d(prob_t) = grad_out . v_t, then the softmax Jacobian.
        grad_logits = _logits(grad_out, value_padded, kernel_size, stride)
        dots = (probs * grad_logits).sum(dim=1, keepdim=True)
        grad_logits.sub_(dots).mul_(probs)

        grad_q = torch.zeros_like(q)
        grad_key_padded = torch.zeros_like(key_padded)
        grad_value_padded = torch.zeros_like(value_padded)
        for t in range(kernel_size**2):
            ty, tx = divmod(t, kernel_size)
            grad_t = grad_logits[:, t : t + 1]
            grad_q.addcmul_(
                grad_t, _window(key_padded, ty, tx, (ho, wo), stride)
            )
            _window(grad_key_padded, ty, tx, (ho, wo), stride).addcmul_(
                grad_t, q
            )
            _window(grad_value_padded, ty, tx, (ho, wo), stride).addcmul_(
                probs[:, t : t + 1], grad_out
            )

        def unpad(grad_padded: Tensor) -> Tensor:
            # Every padded position adds onto the input position it copied.
            by_rows = grad_padded.new_zeros(n, d, h, grad_padded.shape[3])
            by_rows.index_add_(2, rows, grad_padded)
            return grad_padded.new_zeros(n, d, h, w).index_add_(
                3, cols, by_rows
            )

        return (
            grad_q,
            unpad(grad_key_padded),
            unpad(grad_value_padded),
            None,
            None,
        )


class _LocalAttentionNative(Function):
    """CPU implementation calling the compiled kernel."""

    @staticmethod
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
    ) -> Tensor:
        out, lse = _ext.local_attention_forward(q, k, v, kernel_size, stride)
        ctx.save_for_backward(q, k, v, lse)
        ctx.geometry = (kernel_size, stride)
        return out

    @staticmethod
    @once_differentiable  # double backward raises instead of returning 0
    def backward(ctx, grad_out: Tensor):
        q, k, v, lse = ctx.saved_tensors
        kernel_size, stride = ctx.geometry
        grad_q, grad_k, grad_v = _ext.local_attention_backward(
            grad_out.contiguous(), q, k, v, lse, kernel_size, stride
        )
        return grad_q, grad_k, grad_v, None, None


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
        impl (str): ``'auto'`` uses the compiled kernel for CPU tensors when
            it is built and the PyTorch loop otherwise; ``'native'`` and
            ``'pytorch'`` force one (for tests and benchmarks).
            Defaults to ``'auto'``.

    Returns:
        Tensor: ``(N, D, Ho, Wo)``, in the dtype of ``q``.  float32 and
        float64 are computed as they are, other floating dtypes in float32.
    """
    global _warned_fallback
    if impl not in _IMPLS:
        raise ValueError(f'impl must be one of {_IMPLS}, got {impl!r}')
    if not torch.jit.is_tracing():  # traced sizes cannot be compared
        _check(q, k, v, kernel_size, stride)
    dtype = q.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    inputs: list[Tensor] = [x.to(work).contiguous() for x in (q, k, v)]

    on_cpu = q.device.type == 'cpu'
    if impl == 'native' and (_ext is None or not on_cpu):
        raise RuntimeError(
            'the compiled local attention needs CPU tensors and a build of '
            f'mmacmix with its extension ({_EXT_ERROR or "CPU only"})'
        )
    if torch.onnx.is_in_onnx_export():
        out = _local_attention_graph(*inputs, kernel_size, stride)
        return out.to(dtype)
    # A tracer cannot see into the compiled kernel; the loop's function is
    # made of ordinary operators (and FLOP counters recognise it).
    native = impl == 'native' or (
        impl == 'auto'
        and on_cpu
        and _ext is not None
        and not torch.jit.is_tracing()
    )
    if impl == 'auto' and on_cpu and _ext is None and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            'mmacmix was installed without its compiled extension '
            f'({_EXT_ERROR}); local attention falls back to a much slower '
            'PyTorch loop. Reinstall mmacmix with torch importable and a C++ '
            'compiler present (pip install --no-build-isolation ...) to '
            'build it.',
            stacklevel=2,
        )
    function = _LocalAttentionNative if native else _LocalAttentionLoop
    out = function.apply(*inputs, kernel_size, stride)
    return out.to(dtype)
