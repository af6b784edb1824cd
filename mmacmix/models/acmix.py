"""The ACmix operator (Pan et al., CVPR 2022, arXiv 2111.14556).

ACmix shares one set of 1x1 projections (q, k, v) between two paths and adds
their outputs with two learnable scalars:

* an attention path: multi-head self-attention over the projected maps
  (local 7x7 windows in the convolution form, (shifted) windows in Swin);
* a convolution path: a light fully connected layer turns the ``3 * heads``
  projected maps of each channel group into ``k^2`` maps, which a grouped 3x3
  convolution with one-hot ("shift") initial kernels shifts and sums.

:class:`ACmixBase` holds what both forms share (the convolution path and the
mixing rates); :class:`ACmix` is the convolution form used by ACmix-ResNet,
built like an ``nn.Conv2d`` so that mmcv's ``build_conv_layer`` can put it in
place of any 3x3 convolution.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmacmix.ops import local_attention
from mmacmix.registry import MODELS

from .utils import check_image_batch, conv3x3_arguments

SHIFT_KERNEL_SIZE = 3


class ACmixBase(BaseModule):
    """The convolution path and mixing rates shared by every ACmix form.

    Parameter names follow the official code so its weights map one to one:
    ``fc`` (``k^2`` x ``3 * num_heads`` 1x1 convolution), ``dep_conv`` (grouped
    3x3 convolution without bias, one group per head channel), ``rate1``
    (attention) and ``rate2`` (convolution).

    Args:
        embed_dims (int): Channels of q, k, v and of the output.
        num_heads (int): Number of heads; must divide ``embed_dims``.
        fc_bias (bool): Whether ``fc`` has a bias (Swin form: yes, ResNet
            form: no, as in the official code).
        stride (int): Stride of the shift convolution. Defaults to 1.
        num_maps (int, optional): Head-wide maps that ``fc`` mixes, when q
            and k are not as wide as v (ACmix-SAN: one each, beside the
            ``num_heads`` of v). Defaults to None (``3 * num_heads``).
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        fc_bias: bool,
        stride: int = 1,
        num_maps: int | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if embed_dims % num_heads:
            raise ValueError(
                f'embed_dims ({embed_dims}) must be divisible '
                f'by num_heads ({num_heads})'
            )
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        kernel_area = SHIFT_KERNEL_SIZE**2
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.fc = nn.Conv2d(
            num_maps or 3 * num_heads, kernel_area, 1, bias=fc_bias
        )
        self.dep_conv = nn.Conv2d(
            kernel_area * self.head_dims,
            embed_dims,
            SHIFT_KERNEL_SIZE,
            stride=stride,
            padding=SHIFT_KERNEL_SIZE // 2,
            groups=self.head_dims,
            bias=False,
        )
        self.reset_mixing()

    def reset_mixing(self) -> None:
        """Sets both rates to 0.5 and the shift kernels to one-hot.

        Kernel ``i`` of every output channel has its 1 at ``(i // 3, i % 3)``,
        so at initialisation the convolution path sums the ``k^2`` maps, map
        ``i`` shifted by ``(i // 3 - 1, i % 3 - 1)`` with zero padding.
        """
        nn.init.constant_(self.rate1, 0.5)
        nn.init.constant_(self.rate2, 0.5)
        one_hot = torch.eye(SHIFT_KERNEL_SIZE**2).view(
            1, -1, SHIFT_KERNEL_SIZE, SHIFT_KERNEL_SIZE
        )
        with torch.no_grad():
            self.dep_conv.weight.copy_(one_hot.expand_as(self.dep_conv.weight))

    def init_weights(self) -> None:
        """Keeps the shift kernels and rates when a parent re-initialises.

        Parent backbones apply e.g. Kaiming to every ``nn.Conv2d`` first; the
        one-hot kernels and the rates of 0.5 are part of the method, so they
        are restored afterwards (pretrained weights are loaded later still).
        """
        super().init_weights()
        self.reset_mixing()

    def conv_path(self, qkv: Tensor) -> Tensor:
        """Runs the convolution path.

        Args:
            qkv (Tensor): ``(B, 3 * C, H, W)``, channel ``s * C + h * D + d``
                for projection ``s`` (q, k, v), head ``h`` and head channel
                ``d`` (``D`` channels per head); in general ``num_maps``
                head-wide maps, channel ``m * D + d``.

        Returns:
            Tensor: ``(B, C, H', W')``, ``H' = ceil(H / stride)``.
        """
        b, _, h, w = qkv.shape
        grouped = qkv.reshape(b, -1, self.head_dims, h * w)
        shifts = self.fc(grouped)  # (B, k^2, D, HW)
        # The grouped convolution wants channel d * k^2 + i.
        shifts = shifts.transpose(1, 2).reshape(b, -1, h, w)
        return self.dep_conv(shifts)

    def fused_conv_path(
        self,
        x: Tensor,
        proj_weight: Tensor,
        proj_bias: Tensor | None,
        scale: Tensor | None = None,
    ) -> Tensor:
        """:meth:`conv_path` of ``qkv = proj(x)``, as one dense convolution.

        The projection, ``fc`` and the shift convolution are all linear, so
        together they are one 3x3 convolution of ``x``; the biases, a
        constant map before the zero-padded shift convolution, become a map
        that is constant away from the border. The result equals
        ``conv_path(proj(x))``, but runs as a dense convolution, the fastest
        kind there is: on the CPU a grouped convolution with few outputs per
        group, and the 1x1 convolution before it, run far below a dense
        convolution's throughput (``tools/analysis/benchmark_ops.py
        --tables pvt-conv-path`` times both forms).

        Args:
            x (Tensor): ``(B, C_in, H, W)`` input of the projection.
            proj_weight (Tensor): ``(3 * C, C_in)`` projection weight, output
                channels ordered as :meth:`conv_path` expects its input.
            proj_bias (Tensor, optional): ``(3 * C,)`` projection bias.
            scale (Tensor, optional): A factor for the result (``rate2``),
                applied to the composed kernels, which are small, instead of
                to the output.

        Returns:
            Tensor: ``(B, C, H', W')``, ``H' = ceil(H / stride)``.
        """
        heads, dims = self.num_heads, self.head_dims
        kernel = SHIFT_KERNEL_SIZE
        # Output channel d * heads + o reads group d: taps[d, o, j, t].
        taps = self.dep_conv.weight.view(dims, heads, kernel**2, kernel**2)
        mixing = self.fc.weight.view(kernel**2, 3, heads)  # [j, s, h]
        per_map = torch.einsum('dojt,jsh->dosht', taps, mixing)
        weight = torch.einsum(
            'dosht,shdi->doit', per_map, proj_weight.view(3, heads, dims, -1)
        )
        bias = x.new_zeros(self.embed_dims, kernel**2)
        if proj_bias is not None:
            bias = bias + torch.einsum(
                'dosht,shd->dot', per_map, proj_bias.view(3, heads, dims)
            ).reshape(self.embed_dims, -1)
        if self.fc.bias is not None:
            bias = bias + torch.einsum(
                'dojt,j->dot', taps, self.fc.bias
            ).reshape(self.embed_dims, -1)
        if scale is not None:
            weight, bias = weight * scale, bias * scale
        # Contiguous: with the strides einsum leaves, oneDNN would run the
        # convolution channels-last and copy every map in and out of it.
        weight = weight.reshape(self.embed_dims, -1, kernel, kernel)
        conv = F.conv2d(
            x,
            weight.contiguous(),
            stride=self.dep_conv.stride,
            padding=self.dep_conv.padding,
        )
        # The bias map: each output sums the bias taps that fall inside the
        # map, and a tap falls inside when its row and its column do.
        stride = self.dep_conv.stride[0]
        rows = _taps_inside(x.shape[2], conv.shape[2], stride, kernel, x)
        cols = _taps_inside(x.shape[3], conv.shape[3], stride, kernel, x)
        bias_map = torch.einsum(
            'oyx,yi,xj->oij', bias.view(-1, kernel, kernel), rows, cols
        ).unsqueeze(0)
        # In place: a convolution's backward does not read its output.
        return conv.add_(bias_map)

    def mix(self, attention: Tensor, convolution: Tensor) -> Tensor:
        """Returns ``rate1 * attention + rate2 * convolution``."""
        return self.rate1 * attention + self.rate2 * convolution


def _taps_inside(
    size: int, out_size: int, stride: int, kernel: int, like: Tensor
) -> Tensor:
    """``(kernel, out_size)``: 1 where tap ``t`` of output ``i`` of a
    zero-padded ``kernel``-wide convolution reads inside ``[0, size)``."""
    taps = torch.arange(kernel, device=like.device) - kernel // 2
    outputs = torch.arange(out_size, device=like.device) * stride
    positions = taps[:, None] + outputs
    return ((positions >= 0) & (positions < size)).to(like.dtype)


def position_grid(height: int, width: int, like: Tensor) -> Tensor:
    """Returns the ``(1, 2, H, W)`` grid of x and y in ``[-1, 1]``.

    Args:
        height (int): Rows of the grid.
        width (int): Columns of the grid.
        like (Tensor): Tensor whose dtype and device the grid takes.
    """
    xs, ys = _unit_span(width, like), _unit_span(height, like)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


def _unit_span(size: int, like: Tensor) -> Tensor:
    """``torch.linspace(-1, 1, size)``, also when traced for ONNX.

    ONNX exporters write linspace with a step ``2 / (size - 1)``, which is
    NaN for a one-pixel map; here the divisor is clamped to 1 (the single
    point is -1, as linspace gives) without a Python branch on the size.
    """
    steps = torch.arange(size, dtype=like.dtype, device=like.device)
    return steps * (2.0 / steps[-1:].clamp(min=1.0)) - 1.0


def pointwise(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 1x1 convolution, computed as a batched matrix product.

    On the CPU a matrix product reads the maps as they are, where
    ``F.conv2d`` (oneDNN) reorders them to and from its blocked layout
    first, forward and backward; and the bias may vary over positions.

    Args:
        x (Tensor): ``(B, C_in, H, W)``.
        weight (Tensor): ``(C_out, C_in)`` or ``(C_out, C_in, 1, 1)``.
        bias (Tensor): ``(C_out,)``, or ``(C_out, H * W)`` for a bias per
            position.

    Returns:
        Tensor: ``(B, C_out, H * W)``.
    """
    weight = weight.flatten(1)
    if bias.dim() == 1:
        bias = bias[:, None]
    return torch.baddbmm(bias, weight.expand(x.shape[0], -1, -1), x.flatten(2))


@MODELS.register_module()
class ACmix(ACmixBase):
    """ACmix in convolution form: a drop-in for a 3x3 convolution.

    Matches the official ``ACmix(in, out, kernel_att=7, head=4, kernel_conv=3,
    stride)`` parameter for parameter (``conv1``/``conv2``/``conv3`` are the
    q/k/v projections, ``conv_p`` the position encoding) and computes the
    same function, with two differences where the official code fails:
    odd sizes at stride 2 give ``ceil(H / 2)`` rows, like a padded 3x3
    stride-2 convolution, and maps smaller than the attention window reflect
    repeatedly instead of raising.

    The attention logits of the official code, ``q . (k + pe_q - pe_k)``,
    differ from ``q . (k - pe_k)`` by a term constant over each window, which
    the softmax cancels; the latter lets the window kernel see plain keys.

    The signature is that of ``nn.Conv2d`` so that
    ``build_conv_layer(dict(type='mmacmix.ACmix'), ...)`` can replace a 3x3
    convolution. Arguments ACmix cannot honour raise ``ValueError``.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels; divisible by ``num_heads``.
        kernel_size (int): Kernel of the convolution path; only 3.
            Defaults to 3.
        stride (int): 1 or 2. Defaults to 1.
        padding (int): Only 1, the padding a 3x3 convolution needs to keep
            the size. Defaults to 1.
        dilation (int): Only 1. Defaults to 1.
        groups (int): Only 1. Defaults to 1.
        bias (bool): Only False: ACmix has no output bias. Defaults to False.
        num_heads (int): Attention heads. Defaults to 4.
        attn_kernel_size (int): Side of the local attention window; odd.
            Defaults to 7.
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
        num_heads: int = 4,
        attn_kernel_size: int = 7,
        init_cfg: dict | None = None,
    ) -> None:
        stride, _ = conv3x3_arguments(
            'ACmix',
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            strides=(1, 2),
            dilations=(1,),
        )
        if bias:
            raise ValueError(f'ACmix supports only bias=False, got {bias=}')
        if attn_kernel_size < 1 or attn_kernel_size % 2 == 0:
            raise ValueError(
                'attn_kernel_size must be a positive odd '
                f'number, got {attn_kernel_size}'
            )
        super().__init__(
            out_channels,
            num_heads,
            fc_bias=False,
            stride=stride,
            init_cfg=init_cfg,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.attn_kernel_size = attn_kernel_size
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1)
        self.conv_p = nn.Conv2d(2, self.head_dims, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Applies ACmix to ``(B, in_channels, H, W)``.

        Returns:
            Tensor: ``(B, out_channels, ceil(H / s), ceil(W / s))``.
        """
        check_image_batch(x, self.in_channels, 'ACmix')
        b, _, h, w = x.shape
        heads, dims, stride = self.num_heads, self.head_dims, self.stride
        # The softmax scale goes into the q projection and the position
        # encoding into the k bias; rate1 goes into the v projection (the
        # attention is linear in v) and rate2 into the convolution path, so
        # that mixing is one in-place sum. All of these scale small weights
        # instead of whole feature maps.
        scale = dims**-0.5
        position = F.conv2d(
            position_grid(h, w, x), -self.conv_p.weight, -self.conv_p.bias
        )
        key_bias = self.conv2.bias.view(heads, dims, 1) + position.view(
            1, dims, h * w
        )
        q = self.project_queries(x, scale)
        out_hw = q.shape[-2:]
        k = pointwise(x, self.conv2.weight, key_bias.view(-1, h * w))
        v = pointwise(
            x, self.conv3.weight * self.rate1, self.conv3.bias * self.rate1
        )
        attention = local_attention(
            q.view(b * heads, dims, *out_hw),
            k.view(b * heads, dims, h, w),
            v.view(b * heads, dims, h, w),
            self.attn_kernel_size,
            stride=stride,
        )
        weight = torch.cat(
            [self.conv1.weight, self.conv2.weight, self.conv3.weight]
        ).flatten(1)
        bias = torch.cat([self.conv1.bias, self.conv2.bias, self.conv3.bias])
        out = self.fused_conv_path(x, weight, bias, scale=self.rate2)
        return out.add_(attention.view(b, self.out_channels, *out_hw))

    def project_queries(self, x: Tensor, scale: float) -> Tensor:
        """Returns ``scale * conv1(x)`` at the window centres.

        At stride 2 only the positions that centre a window are projected
        (a quarter of them; the official code projects all and strides).

        Returns:
            Tensor: ``(B, C, ceil(H / s), ceil(W / s))``.
        """
        if self.stride > 1:
            x = x[..., :: self.stride, :: self.stride]
        q = pointwise(x, self.conv1.weight * scale, self.conv1.bias * scale)
        return q.view(*q.shape[:2], *x.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f'{self.in_channels}, {self.out_channels}, '
            f'stride={self.stride}, num_heads={self.num_heads}, '
            f'attn_kernel_size={self.attn_kernel_size}'
        )
