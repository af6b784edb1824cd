"""X-volution (Chen, Wang, Ni, arXiv 2106.02253): the operator.

X-volution unites a convolution and an approximation of global
self-attention in one operator. While training it has two branches whose
outputs are added:

* a convolution branch: a 3x3 convolution followed by batch norm;
* a pixel shift self-attention (PSSA) branch: the feature map is shifted by
  ``L`` pixels in several directions, each shifted map is multiplied element
  by element with the unshifted one, and a learned weighted sum of these
  products (a 1x1 convolution over them) goes through batch norm.

Once trained, both norms fold into the convolutions and the two branches
merge into one operator (structural re-parameterisation, as in RepVGG): a
3x3 convolution whose kernel at output pixel ``p`` is a static kernel plus a
content-dependent one, ``K_p = W + x(p) * A``, where ``x(p)`` is the input at
the centre of the window. :meth:`XVolution.switch_to_deploy` performs this
conversion; ``XVolution(..., deploy=True)`` builds the deployed form directly
so that a converted checkpoint loads strictly.

The backbone is :class:`~mmacmix.models.xvolution_resnet.XVolutionResNet`.
"""

import math

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from mmacmix.ops.native import ext as native_ops
from mmacmix.registry import MODELS

from .utils import check_image_batch, conv3x3_arguments

KERNEL_SIZE = 3
# The PSSA taps, row-major over the 3x3 window: tap ``t`` reads the input
# ``(dy, dx) * L`` pixels away, exactly where tap ``t`` of a 3x3 convolution
# with dilation ``L`` reads, which is what lets the branches merge.
TAPS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
ATTENTIONS = ('pssa', 'global')
# The compiled CPU kernel's tiles: about this many output pixels (whole
# rows), their products cut into blocks of channels of about this many
# bytes, which stay in a core's cache between being computed and weighted.
TILE_POSITIONS = 512
BLOCK_BYTES = 2**19
# The PyTorch path's row blocks on the CPU (without the compiled kernel, or
# in reduced precision): shift products per CPU thread, 4 MiB of float32.
BLOCK_ELEMENTS = 2**20
_NOT_DEPLOYABLE = (
    "XVolution with attention='global' has no deployed form: attention "
    'over all positions does not merge into one convolution-style '
    "operator (only attention='pssa' does); use the training form in eval "
    'mode, which also exports to ONNX'
)


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


def _native(x: Tensor) -> bool:
    """Whether the compiled kernel computes the PSSA of ``x``."""
    return (
        native_ops is not None
        and x.device.type == 'cpu'
        and x.dtype in (torch.float32, torch.float64)
    )


def _weighted_rows(
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int,
    base: Tensor | None = None,
) -> Tensor:
    """``base + weight @ shift_products(x)`` tile by tile (the compiled
    kernel) or block by block (:class:`_ProductRows`), added into ``base``
    in place."""
    # Under autocast x may be of a lower type than the weight: it decides.
    weight = weight.to(x.dtype)
    if _native(x):
        # The kernel adds in place only into a contiguous map.
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


class _PixelShiftAttention(torch.autograd.Function):
    """``weight @ shift_products(x)`` computed in tiles (the compiled
    kernel) or row blocks, both ways.

    The products are not kept for the backward pass: each tile or block is
    computed again there, used for the gradients of the weight and of the
    products, and the latter's gradient accumulated into the input's.
    """

    @staticmethod
    def forward(ctx, x, weight, distance, stride):
        ctx.save_for_backward(x, weight)
        ctx.distance, ctx.stride = distance, stride
        return _weighted_rows(x, weight, distance, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # Computed in x's type, as forward (autocast); the weight's
        # gradient accumulated in the weight's.
        grad = grad.to(x.dtype).contiguous()
        need_x, need_weight = ctx.needs_input_grad[:2]
        if _native(x):
            grad_x, grad_weight = native_ops.pixel_shift_backward(
                grad,
                x.contiguous(),
                weight.to(x.dtype).contiguous(),
                ctx.distance,
                ctx.stride,
                need_x,
                need_weight,
                TILE_POSITIONS,
                BLOCK_BYTES,
            )
            if grad_weight is not None:
                grad_weight = grad_weight.to(weight.dtype)
            return grad_x, grad_weight, None, None
        rows = _ProductRows(x, ctx.distance, ctx.stride)
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
            inner = slice(ctx.distance, -ctx.distance)
            grad_x = grad_padded[:, :, inner, inner]
        return grad_x, grad_weight, None, None


def pixel_shift_attention(
    x: Tensor,
    weight: Tensor,
    distance: int,
    stride: int = 1,
    base: Tensor | None = None,
) -> Tensor:
    """``base + weight @ shift_products(x)``: the PSSA branch before its
    norm, or with ``base`` the deployed op's dynamic part.

    Args:
        x (Tensor): ``(B, C_in, H, W)``.
        weight (Tensor): ``(C_out, 9 * C_in)``, input channel ``c * 9 + t``
            (see :func:`shift_products`).
        distance (int): The shift ``L`` in pixels.
        stride (int): Step between output positions. Defaults to 1.
        base (Tensor, optional): Added to the result; updated in place when
            no gradient is needed. Defaults to None.

    Returns:
        Tensor: ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """
    if torch.jit.is_tracing():
        # One graph for every size (ONNX): whole-map products.
        return _weighted_sum(shift_products(x, distance, stride), weight, base)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _PixelShiftAttention.apply(x, weight, distance, stride)
        return out if base is None else base + out
    return _weighted_rows(x, weight, distance, stride, base)


def xvolution(
    x: Tensor,
    weight: Tensor,
    dynamic_weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    dilation: int = 1,
) -> Tensor:
    """The deployed X-volution: a 3x3 convolution with a dynamic kernel.

    At every output pixel ``p`` the kernel applied to the window around
    ``p`` is ``weight + x(p) * dynamic_weight``, i.e.::

        y[o, p] = bias[o] + sum_{c, t} (weight[o, c, t]
                  + x[c, p] * dynamic_weight[o, c, t]) * x[c, p + d_t]

    with taps ``t`` spaced ``dilation`` pixels apart and zero padding. It
    is computed as the static convolution plus the dynamic kernel's
    weighted sum of the shifted products (a matrix product over the
    ``9 * C_in`` products, see :func:`pixel_shift_attention`).

    Args:
        x (Tensor): ``(B, C_in, H, W)``.
        weight (Tensor): Static kernel, ``(C_out, C_in, 3, 3)``.
        dynamic_weight (Tensor): Content-dependent kernel, same shape.
        bias (Tensor, optional): ``(C_out,)``. Defaults to None.
        stride (int): Stride. Defaults to 1.
        dilation (int): Tap spacing (the PSSA shift). Defaults to 1.

    Returns:
        Tensor: ``(B, C_out, ceil(H / stride), ceil(W / stride))``.
    """
    out = F.conv2d(
        x, weight, bias, stride=stride, padding=dilation, dilation=dilation
    )
    # Under autocast the convolution's output type is the op's.
    return pixel_shift_attention(
        x.to(out.dtype), dynamic_weight.flatten(1), dilation, stride, out
    )


def fuse_bn(
    weight: Tensor, norm: _BatchNorm, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Folds an eval-mode batch norm into the convolution before it.

    Returns:
        tuple[Tensor, Tensor]: The kernel and bias of the convolution that
        computes ``norm(conv(x) + bias)`` in eval mode.
    """
    std = (norm.running_var + norm.eps).sqrt()
    scale = norm.weight / std if norm.affine else 1 / std
    shift = norm.bias if norm.affine else torch.zeros_like(scale)
    if bias is not None:
        shift = shift + (bias - norm.running_mean) * scale
    else:
        shift = shift - norm.running_mean * scale
    return weight * scale.reshape(-1, 1, 1, 1), shift


class GlobalSelfAttention(BaseModule):
    """Multi-head self-attention over every position of a map.

    The attention branch of X-volution (SA): 1x1 projections to queries,
    keys and values, scaled dot-product attention of each query over all
    positions (``softmax(q k^T / sqrt(d)) v`` per head), and a 1x1 output
    projection. At stride ``s`` the queries are the positions a strided
    3x3 convolution centres its windows on (every ``s``-th pixel, from the
    first); keys and values are every position. There is no position
    encoding: the convolution branch beside it sees the neighbourhood.

    Computed by :func:`torch.nn.functional.scaled_dot_product_attention` on
    ``(B, heads, tokens, head_dims)`` inputs, so its fused kernels (flash,
    memory-efficient) keep memory linear in the number of positions.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels; divisible by ``num_heads``.
        num_heads (int): Attention heads.
        stride (int): Step between query positions. Defaults to 1.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_heads: int,
        stride: int = 1,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_heads < 1 or out_channels % num_heads:
            raise ValueError(
                f'out_channels ({out_channels}) must be divisible by a '
                f'positive num_heads, got num_heads={num_heads!r}'
            )
        self.channels = out_channels
        self.num_heads = num_heads
        self.stride = stride
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, 1)
        self.proj = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Returns ``(B, out_channels, ceil(H / s), ceil(W / s))``."""
        queries = x[:, :, :: self.stride, :: self.stride]
        # Queries only where there are outputs; keys and values everywhere.
        q_weight, kv_weight = self.qkv.weight.tensor_split([self.channels])
        q_bias, kv_bias = self.qkv.bias.tensor_split([self.channels])
        q = F.conv2d(queries, q_weight, q_bias).flatten(2)
        kv = F.conv2d(x, kv_weight, kv_bias).flatten(2)
        # (B, heads * head_dims, tokens) -> (B, heads, tokens, head_dims).
        q = q.unflatten(1, (self.num_heads, -1)).transpose(2, 3)
        k, v = (
            kv.unflatten(1, (2, self.num_heads, -1)).transpose(3, 4).unbind(1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(x.shape[0], -1, *queries.shape[2:])
        return self.proj(out)


@MODELS.register_module()
class XVolution(BaseModule):
    """X-volution: a 3x3 convolution and self-attention in one operator.

    Training form (``deploy=False``)::

        y = conv_bn(conv(x)) + pssa_bn(pssa(P(x)))            (PSSA)
        y = conv_bn(conv(x)) + attn_bn(attn(x))                 (SA)

    where ``P(x)`` stacks the products ``x * shift(x, L * (dy, dx))`` of the
    map with its copies shifted over the 3x3 taps (see
    :func:`shift_products`), ``pssa`` is the learned weighted sum of these
    products (a 1x1 convolution) and ``conv`` a 3x3 convolution of dilation
    ``L``. Deployed form (``deploy=True`` or after :meth:`switch_to_deploy`):
    the single dynamic convolution :func:`xvolution`, whose kernel at pixel
    ``p`` is ``weight + x(p) * dynamic_weight``.

    ``attention='global'`` is the paper's X-volution (SA): the PSSA branch
    is replaced by true global multi-head self-attention
    (:class:`GlobalSelfAttention`) followed by batch norm. Attention over
    all positions has no single-operator form: it cannot be deployed.

    The paper describes PSSA as shift, element-wise product and weighted
    sum, followed by batch norm, beside a convolution with batch norm; the
    details it leaves open were chosen as follows:

    * Shift distance ``L`` = the ``dilation`` argument (1 by default), and
      the shifts are the eight neighbours at distance ``L`` plus the zero
      shift (the pixel with itself, the diagonal term of self-attention).
      These nine offsets are exactly the taps of the 3x3 convolution of
      dilation ``L``, so the merged operator is one 3x3 dynamic kernel; and
      mmdet's ResNet asks a dilated stage for ``dilation=d, padding=d``,
      which then widens both branches alike.
    * The weighted sum mixes all channels and taps (a dense 1x1 convolution
      over the ``9 * C_in`` products, no bias: the norm after it has one):
      the paper realises the weighted sum with a convolution, and the dense
      form is the one whose merged kernel has the shape of the static one.
    * Borders: shifted-in pixels are zero, like a zero-padded convolution,
      so any input size works (down to 1x1). At stride ``s`` both branches
      are evaluated only at the output positions, giving ``ceil(H / s)``
      rows like a padded 3x3 convolution.
    * The branch norms are part of the operator, so it stands for a
      convolution *and the norm after it*: ``XVolutionResNet`` drops
      the block's norm after each X-volution (its weights go to
      ``conv_bn``). Dropped into a block that keeps its norm (mmdet's
      ``dcn=``), the branch norms' shifts are redundant with that norm, like
      a convolution bias before a norm, and get no gradient in train mode.

    State dict keys (training form): ``conv.weight`` (``C_out, C_in, 3, 3``),
    ``conv.bias`` (``C_out``, only with ``bias=True``), ``conv_bn.*``,
    ``pssa.weight`` (``C_out, 9 * C_in, 1, 1``; input channel ``c * 9 + t``
    for channel ``c`` and tap ``t`` of :data:`TAPS`, the layout of a 3x3
    kernel's ``(C_in, 3, 3)`` block), ``pssa_bn.*``; with
    ``attention='global'``, ``attn.qkv.*`` and ``attn.proj.*`` (1x1
    convolutions with bias) and ``attn_bn.*`` instead of the ``pssa`` ones.
    Deployed form: ``weight`` and ``dynamic_weight`` (both ``C_out, C_in, 3,
    3``) and ``bias`` (``C_out``).

    Loading the state dict of a plain 3x3 convolution (``weight``, and
    ``bias`` if the op has one) into the training form fills the
    convolution branch, the other keys being reported missing: so an
    X-volution put into a ResNet through mmdet's ``dcn=`` starts from the
    ResNet's ImageNet kernel when its checkpoint is loaded non-strictly.

    The signature is that of ``nn.Conv2d`` so that
    ``build_conv_layer(dict(type='mmacmix.XVolution'), ...)`` can replace a
    3x3 convolution; arguments it cannot honour raise ``ValueError``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): Only 3. Defaults to 3.
        stride (int): Any positive stride. Defaults to 1.
        padding (int): Only ``dilation``, the padding that keeps the size.
            Defaults to 1.
        dilation (int): Tap spacing of the convolution and PSSA shift
            distance ``L``. Defaults to 1.
        groups (int): Only 1. Defaults to 1.
        bias (bool): Whether the convolution branch has a bias (folded away
            when deployed; redundant before its norm). Defaults to False.
        norm_cfg (dict): Config of the two branch norms; must build a batch
            norm (BN, SyncBN...) so that it can be folded. Defaults to
            ``dict(type='BN')``.
        attention (str): The attention branch: ``'pssa'`` (pixel shift
            self-attention, deployable) or ``'global'`` (multi-head
            self-attention over all positions). Defaults to ``'pssa'``.
        num_heads (int): Heads of the global attention; must divide
            ``out_channels``. Defaults to 4.
        deploy (bool): Build the deployed form (PSSA only). Defaults to
            False.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        norm_cfg: dict | None = None,
        attention: str = 'pssa',
        num_heads: int = 4,
        deploy: bool = False,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        stride, dilation = conv3x3_arguments(
            'XVolution', kernel_size, stride, padding, dilation, groups
        )
        if attention not in ATTENTIONS:
            raise ValueError(
                f'XVolution attention must be one of {ATTENTIONS}, '
                f'got {attention!r}'
            )
        if deploy and attention != 'pssa':
            raise ValueError(_NOT_DEPLOYABLE)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.with_bias = bool(bias)
        self.norm_cfg = dict(norm_cfg or dict(type='BN'))
        self.attention = attention
        self.deploy = deploy
        # The name of the attention branch (its norm: ``<name>_bn``).
        self.attention_branch = 'pssa' if attention == 'pssa' else 'attn'
        if deploy:
            shape = (out_channels, in_channels, KERNEL_SIZE, KERNEL_SIZE)
            self.weight = nn.Parameter(torch.empty(shape))
            self.dynamic_weight = nn.Parameter(torch.zeros(shape))
            self.bias = nn.Parameter(torch.zeros(out_channels))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            return
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            KERNEL_SIZE,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=self.with_bias,
        )
        self.conv_bn = self._build_norm()
        if attention == 'pssa':
            self.pssa = nn.Conv2d(
                len(TAPS) * in_channels, out_channels, 1, bias=False
            )
        else:
            self.attn = GlobalSelfAttention(
                in_channels, out_channels, num_heads, stride
            )
        setattr(self, f'{self.attention_branch}_bn', self._build_norm())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A plain convolution's weights (``weight``, ``bias``) fill the
        # convolution branch: ImageNet weights of the ResNet an X-volution
        # was dropped into (mmdet's ``dcn=``) then reach it.
        if not self.deploy:
            for name in ('weight', 'bias'):
                plain, branch = f'{prefix}{name}', f'{prefix}conv.{name}'
                if plain in state_dict and branch not in state_dict:
                    state_dict[branch] = state_dict.pop(plain)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _build_norm(self) -> _BatchNorm:
        norm = build_norm_layer(self.norm_cfg, self.out_channels)[1]
        if not isinstance(norm, _BatchNorm):
            raise ValueError(
                'XVolution folds its branch norms when deployed, so norm_cfg '
                f'must build a batch norm, got {type(norm).__name__}'
            )
        return norm

    def forward(self, x: Tensor) -> Tensor:
        """Applies X-volution to ``(B, in_channels, H, W)``.

        Returns:
            Tensor: ``(B, out_channels, ceil(H / s), ceil(W / s))``.
        """
        check_image_batch(x, self.in_channels, 'XVolution')
        if self.deploy:
            return xvolution(
                x,
                self.weight,
                self.dynamic_weight,
                self.bias,
                self.stride,
                self.dilation,
            )
        if self.attention == 'pssa':
            attention = self.pssa_bn(
                pixel_shift_attention(
                    x, self.pssa.weight.flatten(1), self.dilation, self.stride
                )
            )
        else:
            attention = self.attn_bn(self.attn(x))
        return self.conv_bn(self.conv(x)) + attention

    @torch.no_grad()
    def deploy_params(self) -> dict[str, Tensor]:
        """Returns the deployed form's parameters for the current weights.

        Both norms are folded with their running statistics, so the result
        computes what the training form computes in eval mode.

        Returns:
            dict[str, Tensor]: ``weight``, ``dynamic_weight`` and ``bias``.

        Raises:
            ValueError: With ``attention='global'``, which has no deployed
                form.
        """
        if self.attention != 'pssa':
            raise ValueError(_NOT_DEPLOYABLE)
        if self.deploy:
            return dict(
                weight=self.weight.detach().clone(),
                dynamic_weight=self.dynamic_weight.detach().clone(),
                bias=self.bias.detach().clone(),
            )
        weight, bias = fuse_bn(self.conv.weight, self.conv_bn, self.conv.bias)
        pssa, pssa_bias = fuse_bn(self.pssa.weight, self.pssa_bn)
        # Input channel c * 9 + t is kernel entry [c, t // 3, t % 3].
        dynamic = pssa.reshape(weight.shape)
        return dict(
            weight=weight, dynamic_weight=dynamic, bias=bias + pssa_bias
        )

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Turns the op into its deployed, single-operator form in place.

        The branch norms are folded (with their running statistics) and the
        branches merged into ``weight``, ``dynamic_weight`` and ``bias``; the
        training-only modules are deleted. In eval mode the output is
        unchanged up to rounding. Calling it again does nothing.

        Raises:
            ValueError: With ``attention='global'``, which has no deployed
                form.
        """
        if self.deploy:
            return
        params = self.deploy_params()
        # Frozen weights (a frozen stage) stay frozen once merged.
        requires_grad = self.conv.weight.requires_grad
        for name in ('conv', 'conv_bn', 'pssa', 'pssa_bn'):
            delattr(self, name)
        for name, value in params.items():
            self.register_parameter(
                name, nn.Parameter(value.contiguous(), requires_grad)
            )
        self.deploy = True

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, kernel_size=3, '
            f'stride={self.stride}, dilation={self.dilation}, '
            f'attention={self.attention!r}, deploy={self.deploy}'
        )
