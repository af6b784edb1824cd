"""X-volution (Chen, Wang, Ni, arXiv 2106.02253) and an X-volution ResNet.

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

This file holds the whole family: the :class:`XVolution` operator (a drop-in
for a 3x3 convolution through mmcv's ``build_conv_layer``), the
:class:`XVolutionResNet` backbone, and :func:`convert_resnet_to_xvolution`,
which maps torchvision or OpenMMLab ResNet weights onto that backbone.
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmacmix.registry import MODELS

from .resnet import BasicBlock, Bottleneck, PluggableResNet
from .utils import describe_keys, square_argument

KERNEL_SIZE = 3
# The PSSA taps, row-major over the 3x3 window: tap ``t`` reads the input
# ``(dy, dx) * L`` pixels away, exactly where tap ``t`` of a 3x3 convolution
# with dilation ``L`` reads, which is what lets the branches merge.
TAPS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def shift_products(x: Tensor, distance: int, stride: int = 1) -> Tensor:
    """Multiplies the map by its copies shifted over the 3x3 taps.

    Channel ``t * C + c`` of the result is ``x[c, p] * x[c, p + d_t]`` at
    every output position ``p`` (taken every ``stride`` pixels), for tap
    ``t`` of :data:`TAPS` with offset ``d_t = (dy, dx) * distance``. Pixels
    shifted in from beyond the border are zero, as in a zero-padded
    convolution.

    Args:
        x (Tensor): ``(B, C, H, W)``.
        distance (int): The shift ``L`` in pixels.
        stride (int): Step between output positions. Defaults to 1.

    Returns:
        Tensor: ``(B, 9 * C, ceil(H / stride), ceil(W / stride))``.
    """
    _, _, height, width = x.shape
    out_h = -(-height // stride)
    out_w = -(-width // stride)
    padded = F.pad(x, (distance,) * 4)
    centre = x[:, :, ::stride, ::stride]
    products = []
    for dy, dx in TAPS:
        top = distance * (1 + dy)
        left = distance * (1 + dx)
        shifted = padded[
            :,
            :,
            top : top + (out_h - 1) * stride + 1 : stride,
            left : left + (out_w - 1) * stride + 1 : stride,
        ]
        products.append(centre * shifted)
    return torch.cat(products, dim=1)


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

    with taps ``t`` spaced ``dilation`` pixels apart and zero padding.

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
    padded = F.pad(x, (dilation,) * 4)
    centre = x[:, :, ::stride, ::stride]
    # One product map and one 1x1 convolution per tap, accumulated in
    # place: only one product map is alive at a time (the training form
    # keeps all nine for its backward pass). Traced for ONNX, sizes computed
    # from the output's shape (slice ends, flatten / unflatten) were fixed
    # at the traced input's; slices that end at a constant distance from
    # the padded map's end (``top + H``, ceil(H / stride) rows) are not.
    span = 2 * dilation
    for dy, dx in TAPS:
        top = dilation * (1 + dy)
        left = dilation * (1 + dx)
        shifted = padded[
            :,
            :,
            top : top - span or None : stride,
            left : left - span or None : stride,
        ]
        tap_weight = dynamic_weight[:, :, 1 + dy, 1 + dx, None, None]
        out.add_(F.conv2d(centre * shifted, tap_weight))
    return out


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


@MODELS.register_module()
class XVolution(BaseModule):
    """X-volution: a 3x3 convolution and pixel shift self-attention in one.

    Training form (``deploy=False``)::

        y = conv_bn(conv(x)) + pssa_bn(pssa(P(x)))

    where ``P(x)`` stacks the products ``x * shift(x, L * (dy, dx))`` of the
    map with its copies shifted over the 3x3 taps (see
    :func:`shift_products`), ``pssa`` is the learned weighted sum of these
    products (a 1x1 convolution) and ``conv`` a 3x3 convolution of dilation
    ``L``. Deployed form (``deploy=True`` or after :meth:`switch_to_deploy`):
    the single dynamic convolution :func:`xvolution`, whose kernel at pixel
    ``p`` is ``weight + x(p) * dynamic_weight``.

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
      convolution *and the norm after it*: :class:`XVolutionResNet` drops
      the block's norm after each X-volution (its weights go to
      ``conv_bn``). Dropped into a block that keeps its norm (mmdet's
      ``dcn=``), the branch norms' shifts are redundant with that norm, like
      a convolution bias before a norm, and get no gradient in train mode.

    State dict keys (training form): ``conv.weight`` (``C_out, C_in, 3, 3``),
    ``conv.bias`` (``C_out``, only with ``bias=True``), ``conv_bn.*``,
    ``pssa.weight`` (``C_out, 9 * C_in, 1, 1``; input channel ``t * C_in +
    c`` for tap ``t`` of :data:`TAPS` and channel ``c``), ``pssa_bn.*``.
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
        deploy (bool): Build the deployed form. Defaults to False.
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
        deploy: bool = False,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        kernel_size = square_argument('XVolution', 'kernel_size', kernel_size)
        stride = square_argument('XVolution', 'stride', stride)
        padding = square_argument('XVolution', 'padding', padding)
        dilation = square_argument('XVolution', 'dilation', dilation)
        if kernel_size != KERNEL_SIZE:
            raise ValueError(
                'XVolution supports only kernel_size=3, got '
                f'kernel_size={kernel_size!r}'
            )
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(
                'XVolution needs a positive integer dilation, '
                f'got dilation={dilation!r}'
            )
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(
                'XVolution needs a positive integer stride, '
                f'got stride={stride!r}'
            )
        if padding != dilation:
            raise ValueError(
                'XVolution supports only padding=dilation (the padding that '
                f'keeps the size), got padding={padding!r} with '
                f'dilation={dilation!r}'
            )
        if groups != 1:
            raise ValueError(
                f'XVolution supports only groups=1, got groups={groups!r}'
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.with_bias = bool(bias)
        self.norm_cfg = dict(norm_cfg or dict(type='BN'))
        self.deploy = deploy
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
        self.pssa = nn.Conv2d(
            len(TAPS) * in_channels, out_channels, 1, bias=False
        )
        self.pssa_bn = self._build_norm()

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
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'XVolution expects a (B, {self.in_channels}, H, W) tensor, '
                f'got shape {tuple(x.shape)}'
            )
        if self.deploy:
            return xvolution(
                x,
                self.weight,
                self.dynamic_weight,
                self.bias,
                self.stride,
                self.dilation,
            )
        products = shift_products(x, self.dilation, self.stride)
        return self.conv_bn(self.conv(x)) + self.pssa_bn(self.pssa(products))

    @torch.no_grad()
    def deploy_params(self) -> dict[str, Tensor]:
        """Returns the deployed form's parameters for the current weights.

        Both norms are folded with their running statistics, so the result
        computes what the training form computes in eval mode.

        Returns:
            dict[str, Tensor]: ``weight``, ``dynamic_weight`` and ``bias``.
        """
        if self.deploy:
            return dict(
                weight=self.weight.detach().clone(),
                dynamic_weight=self.dynamic_weight.detach().clone(),
                bias=self.bias.detach().clone(),
            )
        weight, bias = fuse_bn(self.conv.weight, self.conv_bn, self.conv.bias)
        pssa, pssa_bias = fuse_bn(self.pssa.weight, self.pssa_bn)
        # (C_out, 9 * C_in, 1, 1), tap-major -> (C_out, C_in, 3, 3).
        dynamic = pssa.reshape(
            self.out_channels, len(TAPS), self.in_channels
        ).transpose(1, 2)
        dynamic = dynamic.reshape(weight.shape)
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
            f'deploy={self.deploy}'
        )


def _drop_norms_after_xvolutions(block: BasicBlock) -> None:
    """Replaces ``bn<i>`` by an identity wherever ``conv<i>`` is an
    X-volution, whose branch norms take the norm's place."""
    for index in (1, 2):
        if isinstance(getattr(block, f'conv{index}'), XVolution):
            setattr(block, f'bn{index}', nn.Identity())


class XVolutionBasicBlock(BasicBlock):
    """:class:`BasicBlock` without norms after its X-volutions."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _drop_norms_after_xvolutions(self)

    @property
    def last_norm(self) -> nn.Module:
        return self.conv2 if isinstance(self.conv2, XVolution) else self.bn2


class XVolutionBottleneck(Bottleneck):
    """:class:`Bottleneck` without the norm after its X-volution."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _drop_norms_after_xvolutions(self)


@MODELS.register_module()
class XVolutionResNet(PluggableResNet):
    """ResNet v1.5 whose 3x3 convolutions in chosen stages are X-volutions.

    The paper found X-volution best in stage 3 alone (ResNet-34 +1.2,
    ResNet-50 +0.9 ImageNet top-1), which is the default. Every 3x3
    convolution of a chosen stage, with the norm after it, becomes an
    X-volution (both of a basic block, the middle one of a bottleneck), with
    the stride the convolution had: the convolution branch and its norm are
    the ResNet's convolution and norm, beside which the PSSA branch is added,
    as in the paper's module. All other modules are torchvision's ResNet's,
    so its weights map directly (see :func:`convert_resnet_to_xvolution`).

    Args:
        depth (int): 18, 34, 50 or 101.
        xvolution_stages (Sequence[bool]): For each of the four stages,
            whether its 3x3 convolutions are X-volutions. Defaults to
            ``(False, False, True, False)``.
        deploy (bool): Build the X-volutions in their deployed form, to
            load a checkpoint written after :meth:`switch_to_deploy`.
            Defaults to False.
        **kwargs: The arguments of :class:`PluggableResNet` (``out_indices``,
            ``frozen_stages``, ``norm_cfg`` (also used for the branch norms
            of the X-volutions), ``norm_eval``, ``with_cp``, ``init_cfg``...).
            ``zero_init_residual`` zeroes both branch norms' scales of an
            X-volution that ends a basic block.

    Example:
        >>> import torch
        >>> model = XVolutionResNet(depth=18).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 96))]
        [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    """

    arch_settings = {
        18: (XVolutionBasicBlock, (2, 2, 2, 2)),
        34: (XVolutionBasicBlock, (3, 4, 6, 3)),
        50: (XVolutionBottleneck, (3, 4, 6, 3)),
        101: (XVolutionBottleneck, (3, 4, 23, 3)),
    }

    def __init__(
        self,
        depth: int,
        xvolution_stages: Sequence[bool] = (False, False, True, False),
        deploy: bool = False,
        **kwargs,
    ) -> None:
        if len(xvolution_stages) != 4:
            raise ValueError(
                'xvolution_stages needs one flag per stage (4), '
                f'got {xvolution_stages!r}'
            )
        self.xvolution_stages = tuple(bool(s) for s in xvolution_stages)
        self.deploy = deploy
        super().__init__(depth, **kwargs)

    def make_conv3x3(
        self, stage: int, in_channels: int, out_channels: int, stride: int
    ) -> nn.Module:
        if not self.xvolution_stages[stage]:
            return super().make_conv3x3(
                stage, in_channels, out_channels, stride
            )
        return XVolution(
            in_channels,
            out_channels,
            stride=stride,
            norm_cfg=self.norm_cfg,
            deploy=self.deploy,
        )

    def _zero_init(self) -> None:
        if not self.zero_init_residual:
            return
        for layer in self.res_layers:
            for block in layer:
                last = block.last_norm
                if not isinstance(last, XVolution):
                    nn.init.zeros_(last.weight)
                elif not last.deploy:
                    # The residual branch is zero when both branches are.
                    nn.init.zeros_(last.conv_bn.weight)
                    nn.init.zeros_(last.pssa_bn.weight)

    def switch_to_deploy(self) -> None:
        """Turns every X-volution into its deployed form, in place.

        In eval mode the outputs do not change (up to rounding); frozen
        stages stay frozen.
        """
        for module in self.modules():
            if isinstance(module, XVolution):
                module.switch_to_deploy()
        self.deploy = True
        self._freeze_stages()


def convert_resnet_to_xvolution(
    checkpoint: Mapping,
    model: XVolutionResNet | None = None,
    depth: int | None = None,
) -> dict[str, Tensor]:
    """Maps ImageNet ResNet weights onto an :class:`XVolutionResNet`.

    Every module but the X-volutions takes the ResNet's weights under the
    same name. For an X-volution at ``P`` (e.g. ``layer3.0.conv2``, in block
    ``B = layer3.0``):

    * the convolution branch is the ResNet's convolution and norm:
      ``P.conv.weight`` takes ``P.weight`` and ``P.conv_bn`` takes the norm
      after it, ``B.bn2`` (``B.bn1`` for ``conv1`` of a basic block), which
      the X-volution ResNet does not have;
    * ``P.pssa.weight`` keeps its initialisation (seeded, so conversion is
      deterministic) and ``P.pssa_bn`` starts with scale 0, shift 0 and
      running statistics 0 and 1: the PSSA branch starts switched off, so the
      converted backbone computes exactly the pretrained ResNet, and
      fine-tuning grows the branch (the scale gets a gradient at once).

    Args:
        checkpoint (Mapping): A torchvision state dict (``conv1.weight``...
            and a ``fc`` classifier, which is dropped), or an OpenMMLab
            checkpoint (mmpretrain/mmcls classifier or mmdet detector:
            ``{'state_dict': {'backbone.conv1.weight', ..., 'head...'}}``,
            whose ``backbone.`` weights are taken). A ``module.`` prefix
            (DataParallel) is removed.
        model (XVolutionResNet, optional): The backbone the weights are for
            (training form); by default an ``XVolutionResNet`` with X-volution
            in stage 3 and the depth of the checkpoint.
        depth (int, optional): Expected depth; read from the keys if None.

    Returns:
        dict[str, Tensor]: The backbone's state dict, without prefix.

    Raises:
        KeyError: If keys are missing or unknown (all are named).
        ValueError: If the checkpoint is no ResNet of a known depth, its
            depth is not ``depth``, a shape differs, or ``model`` is
            deployed.
    """
    state_dict = _resnet_state_dict(checkpoint)
    found = _resnet_depth(state_dict)
    if depth is not None and depth != found:
        raise ValueError(
            f'expected a ResNet-{depth}, but the checkpoint '
            f'holds a ResNet-{found}'
        )
    if model is None:
        # A fixed seed makes the PSSA initialisation, and so the converted
        # file, the same on every run, without touching the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = XVolutionResNet(depth=found)
            model.init_weights()
    elif model.depth != found:
        raise ValueError(
            f'the model is an XVolutionResNet-{model.depth}, '
            f'but the checkpoint holds a ResNet-{found}'
        )
    if model.deploy:
        raise ValueError(
            'convert into the training form (deploy=False); '
            'deploy afterwards with switch_to_deploy() or '
            'tools/deploy/reparameterize.py'
        )
    expected = model.state_dict()
    ops = [
        name
        for name, module in model.named_modules()
        if isinstance(module, XVolution)
    ]
    # The ResNet's norm after an X-volution becomes its branch norm.
    renames = {}
    for path in ops:
        block, _, conv = path.rpartition('.')
        renames[path] = f'{path}.conv'
        renames[f'{block}.bn{conv.removeprefix("conv")}'] = f'{path}.conv_bn'
    converted = {}
    for key, value in state_dict.items():
        module, dot, name = key.rpartition('.')
        converted[f'{renames.get(module, module)}{dot}{name}'] = value
    for path in ops:
        like = expected[f'{path}.pssa_bn.running_var']
        converted.update(
            {
                f'{path}.pssa.weight': expected[f'{path}.pssa.weight'].clone(),
                f'{path}.pssa_bn.weight': torch.zeros_like(like),
                f'{path}.pssa_bn.bias': torch.zeros_like(like),
                f'{path}.pssa_bn.running_mean': torch.zeros_like(like),
                f'{path}.pssa_bn.running_var': torch.ones_like(like),
            }
        )
        key = f'{path}.pssa_bn.num_batches_tracked'
        if key in expected:
            converted[key] = torch.zeros_like(expected[key])
    missing = sorted(set(expected) - set(converted))
    unknown = sorted(set(converted) - set(expected))
    if missing or unknown:
        raise KeyError(
            f'the checkpoint does not map onto XVolutionResNet-{found}: '
            f'missing keys {describe_keys(missing)}; unknown keys '
            f'{describe_keys(unknown)}'
        )
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f'{key} has shape {tuple(value.shape)}, '
                f'expected {tuple(expected[key].shape)}'
            )
    return converted


def _resnet_state_dict(checkpoint: Mapping) -> dict[str, Tensor]:
    """Returns the ResNet weights of a checkpoint, without classifier."""
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError('the checkpoint holds no state dict')
    state_dict = {
        key.removeprefix('module.'): value for key, value in state_dict.items()
    }
    if any(key.startswith('backbone.') for key in state_dict):
        # OpenMMLab: the classifier or detector around the backbone goes.
        return {
            key.removeprefix('backbone.'): value
            for key, value in state_dict.items()
            if key.startswith('backbone.')
        }
    # torchvision: the ImageNet classifier goes.
    return {
        key: value
        for key, value in state_dict.items()
        if not key.startswith('fc.')
    }


def _resnet_depth(state_dict: Mapping[str, Tensor]) -> int:
    """Reads the depth from the blocks per stage and the block type."""
    blocks = tuple(
        len(
            {
                key.split('.')[1]
                for key in state_dict
                if key.startswith(f'layer{stage}.')
            }
        )
        for stage in range(1, 5)
    )
    bottleneck = any(key.endswith('.conv3.weight') for key in state_dict)
    for depth, (block, stage_blocks) in XVolutionResNet.arch_settings.items():
        if (
            blocks == stage_blocks
            and issubclass(block, Bottleneck) == bottleneck
        ):
            return depth
    valid = {
        depth: stage_blocks
        for depth, (_, stage_blocks) in XVolutionResNet.arch_settings.items()
    }
    raise ValueError(
        f'not a torchvision-style ResNet of a known depth: blocks per stage '
        f'{blocks} ({"bottleneck" if bottleneck else "basic"} blocks); '
        f'valid: {valid}'
    )
