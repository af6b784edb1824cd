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
from torch.nn.modules.batchnorm import _BatchNorm

from mmacmix.ops.pixel_shift import TAPS, pixel_shift_attention
from mmacmix.registry import MODELS

from .utils import check_image_batch, conv3x3_arguments

KERNEL_SIZE = 3
ATTENTIONS = ('pssa', 'global')
_NOT_DEPLOYABLE = (
    "XVolution with attention='global' has no deployed form: attention "
    'over all positions does not merge into one convolution-style '
    "operator (only attention='pssa' does); use the training form in eval "
    'mode, which also exports to ONNX'
)


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
    ``9 * C_in`` products, see
    :func:`~mmacmix.ops.pixel_shift.pixel_shift_attention`).

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
    :func:`~mmacmix.ops.pixel_shift.shift_products`), ``pssa`` is the
    learned weighted sum of these products (a 1x1 convolution) and ``conv``
    a 3x3 convolution of dilation ``L``. Deployed form (``deploy=True`` or
    after :meth:`switch_to_deploy`): the single dynamic convolution
    :func:`xvolution`, whose kernel at pixel ``p`` is ``weight + x(p) *
    dynamic_weight``.

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
    for channel ``c`` and tap ``t`` of
    :data:`~mmacmix.ops.pixel_shift.TAPS`, the layout of a 3x3 kernel's
    ``(C_in, 3, 3)`` block), ``pssa_bn.*``; with
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
