"""Pixel shift products, the attention branch (PSSA) of X-volution.

A feature map is multiplied element by element with its copies shifted by
``L`` pixels over the nine taps of a 3x3 window, and a dense matrix weights
the ``9 * C`` products into ``C_out`` output channels::

    out[n, o, p] = sum_{c, t} weight[o, 9 c + t] * x[n, c, s p]
                   * x[n, c, s p + L d_t]

for the taps ``d_t`` of :data:`TAPS`, zero outside the map, at the output
positions ``p`` of a padded 3x3 convolution of stride ``s``. This is the
PSSA branch of X-volution before its norm and, added onto a convolution's
output, the dynamic part of the deployed X-volution.

The function is one registered operator, ``torch.ops.mmacmix.pixel_shift``
(with ``torch.ops.mmacmix.pixel_shift_backward`` as its registered
autograd), so that ``torch.compile`` sees one node. Implementations:

* CPU, float32 and float64: a compiled C++ kernel (``mmacmix.ops._ext``)
  that forms the products of a tile of rows and a block of channels in a
  per-thread buffer and weights them there;
* any device or dtype, and wherever the kernel is missing: PyTorch, a block
  of output rows at a time (:class:`_ProductRows`).

Neither keeps the ``9 * C``-fold products for the backward pass: both
recompute them there. While traced for ONNX the whole map's products are
formed with plain operators, so one exported graph serves any input size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native
from .native import IMPORT_ERROR as _EXT_ERROR
from .native import ext as native_ops

__all__ = ['TAPS', 'pixel_shift_attention', 'shift_products']

# The taps, row-major over the 3x3 window: tap ``t`` reads the input
# ``(dy, dx) * L`` pixels away, exactly where tap ``t`` of a 3x3 convolution
# with dilation ``L`` reads, which is what lets X-volution's branches merge.
TAPS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
IMPLS = ('auto', 'native', 'pytorch')
# The compiled kernel's tiles: about this many output pixels (whole rows),
# their products cut into blocks of channels of about this many bytes,
# which stay in a core's cache between being computed and weighted.
TILE_POSITIONS = 512
BLOCK_BYTES = 2**19
# The PyTorch path's row blocks on the CPU: shift products per CPU thread,
# 4 MiB of float32.
BLOCK_ELEMENTS = 2**20
_NATIVE_DTYPES = (torch.float32, torch.float64)
# The op's name in the warning that the compiled kernel is missing.
OP_NAME = 'X-volution PSSA'


def _tap_window(
    padded: Tensor, dy: int, dx: int, distance: int, stride: int
) -> Tensor:
    """The view of a map padded by ``distance`` that tap ``(dy, dx)`` reads
    for every output position: ``padded[p * stride + (1 + d) * L]``.

    The slices end at a fixed distance from the padded map's end, so that
    a graph traced for ONNX keeps them relative to the input size (ends
    computed from the size would be fixed at the traced one).
    """
    top = distance * (1 + dy)
    left = distance * (1 + dx)
    span = 2 * distance
    return padded[
        :,
        :,
        top : top - span or None : stride,
        left : left - span or None : stride,
    ]


def shift_products(x: Tensor, distance: int, stride: int = 1) -> Tensor:
    """Multiplies the map by its copies shifted over the 3x3 taps.

    Channel ``c * 9 + t`` of the result is ``x[c, p] * x[c, p + d_t]`` at
    every output position ``p`` (taken every ``stride`` pixels), for tap
    ``t`` of :data:`TAPS` with offset ``d_t = (dy, dx) * distance``: the
    order of the input channels of a 3x3 kernel's ``(C_in, 3, 3)`` block,
    so that a kernel viewed as ``(C_out, 9 * C_in)`` weights the products.
    Pixels shifted in from beyond the border are zero, as in a zero-padded
    convolution.

    Args:
        x (Tensor): ``(B, C, H, W)``.
        distance (int): The shift ``L`` in pixels.
        stride (int): Step between output positions. Defaults to 1.

    Returns:
        Tensor: ``(B, 9 * C, ceil(H / stride), ceil(W / stride))``.
    """
    padded = F.pad(x, (distance,) * 4)
    centre = x[:, :, ::stride, ::stride]
    products = [
        centre * _tap_window(padded, *tap, distance, stride) for tap in TAPS
    ]
    return torch.stack(products, dim=2).flatten(1, 2)


def _weighted_sum(
    products: Tensor, weight: Tensor, base: Tensor | None = None
) -> Tensor:
    """``base + weight @ products`` per image, as one batched matrix
    product: ``(B, C_out, H', W')`` from ``(B, K, H', W')`` and a
    ``(C_out, K)`` weight (``base`` of the output's shape, or None)."""
    batch = products.shape[0]
    weight = weight.expand(batch, -1, -1)
    if base is None:
        out = torch.bmm(weight, products.flatten(2))
        return out.view(batch, -1, *products.shape[2:])
    out = torch.baddbmm(base.flatten(2), weight, products.flatten(2))
    return out.view_as(base)


class _ProductRows:
    """The shift products of a map, a block of output rows at a time.

    The nine products of a whole map are nine times its size: written to
    memory and read back by the matrix product, they would cost more than
    the convolution beside them. A block of rows (:data:`BLOCK_ELEMENTS`
    products) stays in the cache between being computed and being used,
    forward and backward; on CUDA one block covers the map.

    Args:
        x (Tensor): ``(B, C, H, W)``.
        distance (int): The shift ``L`` in pixels.
        stride (int): Step between output positions.
    """

    def __init__(self, x: Tensor, distance: int, stride: int) -> None:
        self.padded = F.pad(x, (distance,) * 4)
        self.distance = distance
        self.stride = stride
        self.height = -(-x.shape[2] // stride)
        self.width = -(-x.shape[3] // stride)
        rows = self.height
        if x.device.type == 'cpu':
            per_row = x.shape[0] * x.shape[1] * len(TAPS) * self.width
            block = BLOCK_ELEMENTS * torch.get_num_threads()
            rows = max(1, block // per_row)
        self.blocks = [
            (top, min(top + rows, self.height))
            for top in range(0, self.height, rows)
        ]

    def window(
        self, padded: Tensor, dy: int, dx: int, start: int, stop: int
    ) -> Tensor:
        """The view of ``padded`` (or its gradient) that tap ``(dy, dx)``
        reads for output rows ``[start, stop)``."""
        step, distance = self.stride, self.distance
        top = start * step + distance * (1 + dy)
        left = distance * (1 + dx)
        return padded[
            :,
            :,
            top : top + (stop - start - 1) * step + 1 : step,
            left : left + (self.width - 1) * step + 1 : step,
        ]

    def taps(self, start: int, stop: int) -> Tensor:
        """All nine windows of rows ``[start, stop)`` as one view without
        copy, ``(B, C, 3, 3, rows, W')``: tap ``(dy, dx)`` at ``[dy + 1,
        dx + 1]``, the nine a fixed step apart in memory (like an unfold)."""
        first = self.window(self.padded, -1, -1, start, stop)
        batch, channels, rows, width = first.shape
        step = self.distance * self.padded.stride(2)
        return first.as_strided(
            (batch, channels, 3, 3, rows, width),
            (*first.stride()[:2], step, self.distance, *first.stride()[2:]),
            first.storage_offset(),
        )

    def products(self, start: int, stop: int) -> Tensor:
        """``shift_products`` of output rows ``[start, stop)``, as
        ``(B, 9 * C, (stop - start) * W')``: one broadcast product."""
        centre = self.window(self.padded, 0, 0, start, stop)
        taps = self.taps(start, stop)
        # Written into a contiguous tensor: the order the matrix product
        # reads (a plain product would follow the taps' strides).
        products = torch.mul(
            centre[:, :, None, None],
            taps,
            out=torch.empty_like(taps, memory_format=torch.contiguous_format),
        )
        return products.flatten(1, 3).flatten(2)

    def backward(
        self, grad_padded: Tensor, grad: Tensor, start: int, stop: int
    ) -> None:
        """Adds the gradient of the products of rows ``[start, stop)``
        (``grad``, shaped as :meth:`products`) to the padded map's.

        Product ``t`` at ``p`` is ``centre(p) * window_t(p)``: its gradient
        goes to both pixels, ``grad_t * window_t`` to the centre and
        ``grad_t * centre`` to the neighbour (tap by tap: the neighbours'
        windows overlap).
        """
        batch, channels = self.padded.shape[:2]
        grads = grad.view(batch, channels, 3, 3, stop - start, -1)
        centre = self.window(self.padded, 0, 0, start, stop)
        grad_centre = self.window(grad_padded, 0, 0, start, stop)
        grad_centre.add_((grads * self.taps(start, stop)).sum((2, 3)))
        for dy, dx in TAPS:
            grad_window = self.window(grad_padded, dy, dx, start, stop)
            grad_window.addcmul_(grads[:, :, dy + 1, dx + 1], centre)


def native_available() -> bool:
    """Whether the compiled CPU kernel could be imported."""
    return native_ops is not None


def _resolve(impl: str, x: Tensor) -> str:
    """The implementation that ``impl`` means for ``x``.

    Raises:
        RuntimeError: If ``'native'`` is forced where it cannot run.
    """
    runs_natively = (
        native_ops is not None
        and x.device.type == 'cpu'
        and x.dtype in _NATIVE_DTYPES
    )
    if impl == 'auto':
        return 'native' if runs_natively else 'pytorch'
    if impl == 'native' and not runs_natively:
        missing = '' if native_ops else f' and no extension ({_EXT_ERROR})'
        raise RuntimeError(
            'the compiled pixel shift kernel needs float32 or float64 CPU '
            'tensors and a build of mmacmix with its extension; got '
            f'{x.dtype} {x.device.type} tensors{missing}'
        )
    return impl


def _native_forward(
    x: Tensor, weight: Tensor, distance: int, stride: int, base: Tensor | None
) -> Tensor:
    """The compiled kernel's ``base + weight @ shift_products(x)``, added
    into ``base`` in place when it is contiguous."""
    into = base if base is None or base.is_contiguous() else None
    out = native_ops.pixel_shift_forward(
        x.contiguous(),
        weight.contiguous(),
        into,
        distance,
        stride,
        TILE_POSITIONS,
        BLOCK_BYTES,
    )
    return out if into is base else base.add_(out)


def _native_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int,
    need_x: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The compiled kernel's gradients of x and of the weight (None where
    not needed), in x's dtype."""
    grad_x, grad_weight = native_ops.pixel_shift_backward(
        grad,
        x.contiguous(),
        weight.contiguous(),
        distance,
        stride,
        need_x,
        need_weight,
        TILE_POSITIONS,
        BLOCK_BYTES,
    )
    return grad_x, grad_weight


def _pytorch_forward(
    x: Tensor, weight: Tensor, distance: int, stride: int, base: Tensor | None
) -> Tensor:
    """``base + weight @ shift_products(x)`` a block of rows at a time,
    added into ``base`` in place."""
    rows = _ProductRows(x, distance, stride)
    batch = x.shape[0]
    if base is None:
        out = x.new_empty(batch, weight.shape[0], rows.height, rows.width)
    else:
        out = base
    for start, stop in rows.blocks:
        products = rows.products(start, stop)
        for image in range(batch):
            # A view of the output rows: the product is written in place.
            block = out[image, :, start:stop].view(weight.shape[0], -1)
            block.addmm_(weight, products[image], beta=int(base is not None))
    return out


def _pytorch_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int,
    need_x: bool,
    need_weight: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of x (in x's dtype) and of the weight (accumulated in
    the weight's), None where not needed, a block of rows at a time."""
    rows = _ProductRows(x, distance, stride)
    batch = x.shape[0]
    grad_weight = torch.zeros_like(weight) if need_weight else None
    grad_padded = torch.zeros_like(rows.padded) if need_x else None
    transposed = weight.t().to(x.dtype).expand(batch, -1, -1)
    for start, stop in rows.blocks:
        products = rows.products(start, stop)
        block = grad[:, :, start:stop].reshape(batch, weight.shape[0], -1)
        if need_weight:
            grad_weight.addbmm_(
                block.to(weight.dtype),
                products.to(weight.dtype).transpose(1, 2),
            )
        if need_x:
            grad_products = torch.bmm(transposed, block)
            rows.backward(grad_padded, grad_products, start, stop)
    grad_x = None
    if need_x:
        inner = slice(distance, -distance)
        grad_x = grad_padded[:, :, inner, inner]
    return grad_x, grad_weight


def _weighted_rows(
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int,
    impl: str,
    base: Tensor | None = None,
) -> Tensor:
    """``base + weight @ shift_products(x)`` tile by tile (the compiled
    kernel) or block by block (PyTorch), added into ``base`` in place."""
    # Under autocast x may be of a lower type than the weight: it decides.
    weight = weight.to(x.dtype)
    resolved = _resolve(impl, x)
    if resolved == 'native':
        return _native_forward(x, weight, distance, stride, base)
    if impl == 'auto' and native_ops is None and x.device.type == 'cpu':
        # Here, in code that runs eagerly (the op's body or the no-grad
        # path), not where torch.compile traces.
        native.warn_fallback_once(OP_NAME)
    return _pytorch_forward(x, weight, distance, stride, base)


def _output_shape(x: Tensor, weight: Tensor, stride: int) -> tuple[int, ...]:
    return (
        x.shape[0],
        weight.shape[0],
        -(-x.shape[2] // stride),
        -(-x.shape[3] // stride),
    )


@torch.library.custom_op('mmacmix::pixel_shift', mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor, distance: int, stride: int, impl: str
) -> Tensor:
    """``weight @ shift_products(x)`` in x's dtype."""
    return _weighted_rows(x, weight, distance, stride, impl)


@_forward_op.register_fake
def _(x, weight, distance, stride, impl):
    return x.new_empty(_output_shape(x, weight, stride))


@torch.library.custom_op('mmacmix::pixel_shift_backward', mutates_args=())
def _backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int,
    need_x: bool,
    need_weight: bool,
    impl: str,
) -> tuple[Tensor, Tensor]:
    """The gradients of x and of the weight, each in its input's dtype;
    an empty tensor stands for one that is not needed."""
    # Computed in x's type, as forward (autocast); the weight's gradient
    # accumulated in the weight's.
    grad = grad.to(x.dtype).contiguous()
    if _resolve(impl, x) == 'native':
        grad_x, grad_weight = _native_backward(
            grad, x, weight.to(x.dtype), distance, stride, need_x, need_weight
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
    else:
        grad_x, grad_weight = _pytorch_backward(
            grad, x, weight, distance, stride, need_x, need_weight
        )
    return (
        x.new_empty(0) if grad_x is None else grad_x,
        weight.new_empty(0) if grad_weight is None else grad_weight,
    )


@_backward_op.register_fake
def _(grad, x, weight, distance, stride, need_x, need_weight, impl):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(weight) if need_weight else weight.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, distance, stride, impl = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (distance, stride)
    ctx.impl = impl


def _backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[:2]
    grad_x, grad_weight = _backward_op(
        grad, x, weight, *ctx.geometry, need_x, need_weight, ctx.impl
    )
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    'mmacmix::pixel_shift', _backward, setup_context=_setup_context
)


def pixel_shift_attention(
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int = 1,
    base: Tensor | None = None,
    *,
    impl: str = 'auto',
) -> Tensor:
    """``base + weight @ shift_products(x)``: the PSSA branch before its
    norm, or with ``base`` the deployed X-volution's dynamic part.

    Args:
        x (Tensor): ``(B, C_in, H, W)``.
        weight (Tensor): ``(C_out, 9 * C_in)``, input channel ``c * 9 + t``
            (see :func:`shift_products`).
        distance (int): The shift ``L`` in pixels.
        stride (int): Step between output positions. Defaults to 1.
        base (Tensor, optional): Added to the result; updated in place when
            no gradient is needed (and not under ``torch.compile``).
            Defaults to None.
        impl (str): ``'auto'`` runs the compiled kernel on float32 and
            float64 CPU tensors and PyTorch elsewhere or when the kernel is
            missing (with a warning, once, on the CPU); ``'native'`` and
            ``'pytorch'`` force one. Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C_out, ceil(H / stride), ceil(W / stride))``, in x's
        dtype (the weight is cast to it).
    """
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
    if torch.jit.is_tracing():
        # One graph for every size (ONNX): whole-map products.
        return _weighted_sum(shift_products(x, distance, stride), weight, base)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        # Raises early, with the reason, for a forced impl that cannot run.
        _resolve(impl, x)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad
    )
    if needs_grad or compiling:
        out = _forward_op(x, weight, distance, stride, impl)
        return out if base is None else base + out
    return _weighted_rows(x, weight, distance, stride, impl, base)
