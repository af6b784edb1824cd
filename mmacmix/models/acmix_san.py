"""ACmix-SAN: the patchwise self-attention network with ACmix.

SAN (Zhao, Jia and Koltun, "Exploring Self-attention for Image
Recognition", CVPR 2020) is a ResNet-like network built from
self-attention blocks. Its patchwise form, the base of the ACmix paper's
ACmix-SAN-10/15/19, is modelled here with the module names of the reference
code (``hszhao/SAN``, ``model/san.py``): a 1x1 stem at full resolution, then
five stages, each a 1x1 transition convolution after a 2x2 max pool, a
stack of pre-activation bottlenecks ``BN-ReLU-SAM-BN-ReLU-1x1`` and a
BN-ReLU. Stage 0 (64 channels, stride 2) belongs to the stem; stages 1 to 4
(256, 512, 1024 and 2048 channels) give the maps at strides 4, 8, 16 and 32.

The self-attention module (SAM) of a block of width ``C`` projects q and k
to ``C / 16`` channels and v to ``C / 4``. Its patchwise attention does not
compare q with each key: a small network (BN-ReLU-1x1-BN-ReLU-1x1) reads the
query together with the whole ``k x k`` patch of keys around it and predicts
one weight per window position for each group of channels (channel ``c``
uses group ``c % (C / 32)``, 8 channels a group); the values of the
(reflection-padded) window are summed with these weights as they are, with
no softmax. That is a different function from the softmax attention of
:func:`mmacmix.ops.local_attention`, so that op cannot compute it; the
weighted sum runs as :func:`mmacmix.ops.patch_aggregation` (Triton kernels
on CUDA), which never stores ``k^2`` copies of the values. The patch of
keys fed to the weight network is gathered explicitly
(:func:`gather_patches`, two gathers): it is that network's input, ``k^2``
maps of ``C / 16`` channels.

How ACmix enters SAN is not published; only the parameters and FLOPs of
ACmix-SAN-10/15/19 are (12.1M / 1.9G, 16.6M / 2.7G, 21.2M / 3.4G, with the
classifier). The choices made here:

* **Shared projections.** The convolution path reads the SAM's own q, k and
  v, as ACmix shares its projections. q and k are a quarter as wide as v, so
  the official ``3 * heads`` maps do not exist; all three are cut into
  pieces of ``D = C / 16`` channels (the width of q and k): one piece of q,
  one of k and four of v. ``fc`` mixes these 6 maps into 9 shift maps and
  the shift convolution ``dep_conv`` (one group per piece channel, the
  one-hot initial kernels of ACmix) returns the ``C / 4`` channels of v.
  Widening q and k to ``C / 4`` so that the official layout applies would
  add ``3 C^2 / 8`` parameters a block, 3.4M for ACmix-SAN-10, where the
  published numbers leave room for about 0.3M; the design here adds
  ``81 C / 4 + 56`` a block (0.15M for ACmix-SAN-10).
* **Mixing** happens where SAN's attention output is, before ``bn2``:
  ``rate1 * attention + rate2 * convolution``, both rates starting at 0.5.
* **Any input size.** The max pools round up (``ceil_mode``), so odd sides
  give ``ceil(H / 2)`` rows like a padded strided convolution (SAN floors;
  even sizes are unchanged), and the reflection is folded periodically, so
  maps smaller than the window work (``ReflectionPad2d`` raises on them).

With ``with_acmix=False`` the same class is the plain patchwise SAN.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule, Sequential
from torch import Tensor, nn

from mmacmix.ops.local_attention import fold_index
from mmacmix.ops.patch_aggregation import patch_aggregation
from mmacmix.registry import MODELS

from .acmix import ACmixBase, pointwise
from .utils import (
    FrozenStagesMixin,
    arch_settings,
    check_image_batch,
    conv_net_init_cfg,
    freeze,
    init_weights_strictly,
    stage_arguments,
)

NUM_STAGES = 4
STEM_CHANNELS = 64


def gather_patches(x: Tensor, kernel_size: int) -> Tensor:
    """The ``k x k`` reflection-padded patch around every pixel.

    Two gathers and one copy, whatever ``k``: the rows of every window row
    ``ty`` are gathered at once (``k * H`` rows), then the columns (``k *
    W``), and the window axes are moved before the map's.

    Args:
        x (Tensor): ``(B, C, H, W)``.
        kernel_size (int): Odd patch side ``k``.

    Returns:
        Tensor: ``(B, C * k^2, H, W)``, channel ``c * k^2 + t`` holding
        ``x[:, c]`` at offset ``t = ty * k + tx`` (``nn.Unfold``'s order).
    """
    b, channels, height, width = x.shape
    taps = torch.arange(kernel_size, device=x.device)[:, None]
    rows = fold_index(
        taps + torch.arange(height, device=x.device) - kernel_size // 2,
        height,
    )
    cols = fold_index(
        taps + torch.arange(width, device=x.device) - kernel_size // 2,
        width,
    )
    patches = x.index_select(2, rows.flatten()).index_select(3, cols.flatten())
    patches = patches.view(
        b, channels, kernel_size, height, kernel_size, width
    )
    return patches.permute(0, 1, 2, 4, 3, 5).reshape(
        b, channels * kernel_size**2, height, width
    )


class PatchwiseSelfAttention(BaseModule):
    """SAN's patchwise self-attention module, optionally with ACmix.

    Args:
        in_channels (int): Input channels.
        rel_channels (int): Channels of q and k (``conv1``, ``conv2``).
        out_channels (int): Channels of v (``conv3``) and of the output.
        share_channels (int): Channels that share one attention weight.
            Defaults to 8.
        kernel_size (int): Odd window side. Defaults to 7.
        with_acmix (bool): Add ACmix's convolution path (module ``acmix``,
            an :class:`ACmixBase`). Defaults to True.
        norm_cfg (dict): Norms of the weight network. Defaults to BN.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        in_channels: int,
        rel_channels: int,
        out_channels: int,
        share_channels: int = 8,
        kernel_size: int = 7,
        with_acmix: bool = True,
        norm_cfg: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be odd, got {kernel_size}')
        if out_channels % share_channels or (
            with_acmix and out_channels % rel_channels
        ):
            raise ValueError(
                f'out_channels ({out_channels}) must be divisible by '
                f'share_channels ({share_channels}) and, with ACmix, by '
                f'rel_channels ({rel_channels})'
            )
        norm_cfg = norm_cfg or dict(type='BN')
        self.rel_channels = rel_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.groups = out_channels // share_channels
        self.conv1 = nn.Conv2d(in_channels, rel_channels, 1)
        self.conv2 = nn.Conv2d(in_channels, rel_channels, 1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, 1)
        patch_channels = rel_channels * (kernel_size**2 + 1)
        self.conv_w = nn.Sequential(
            build_norm_layer(norm_cfg, patch_channels)[1],
            nn.ReLU(inplace=True),
            nn.Conv2d(patch_channels, self.groups, 1, bias=False),
            build_norm_layer(norm_cfg, self.groups)[1],
            nn.ReLU(inplace=True),
            nn.Conv2d(self.groups, kernel_size**2 * self.groups, 1),
        )
        self.acmix = None
        if with_acmix:
            pieces = out_channels // rel_channels
            self.acmix = ACmixBase(
                out_channels, pieces, fc_bias=False, num_maps=pieces + 2
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``."""
        b, _, height, width = x.shape
        convs = (self.conv1, self.conv2, self.conv3)
        qkv = pointwise(
            x,
            torch.cat([conv.weight for conv in convs]),
            torch.cat([conv.bias for conv in convs]),
        ).view(b, -1, height, width)
        rel = self.rel_channels
        q, k, v = qkv.split([rel, rel, self.out_channels], dim=1)
        patch = torch.cat([q, gather_patches(k, self.kernel_size)], dim=1)
        weights = self.conv_w(patch).view(
            b, self.groups, self.kernel_size**2, height, width
        )
        attention = patch_aggregation(v, weights, self.kernel_size)
        if self.acmix is None:
            return attention
        return self.acmix.mix(attention, self.acmix.conv_path(qkv))

    def extra_repr(self) -> str:
        return (
            f'rel_channels={self.rel_channels}, out_channels='
            f'{self.out_channels}, kernel_size={self.kernel_size}'
        )


class SANBottleneck(BaseModule):
    """Pre-activation bottleneck: ``x + conv(ReLU(BN(SAM(ReLU(BN(x))))))``.

    Args:
        channels (int): Input and output channels ``C``; the SAM has q, k of
            ``C / 16`` and v of ``C / 4`` channels.
        kernel_size (int): Attention window side.
        share_channels (int): Channels sharing one attention weight.
        with_acmix (bool): Whether the SAM has ACmix's convolution path.
        norm_cfg (dict): Normalisation config.
        with_cp (bool): Recompute the residual branch in backward.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        share_channels: int,
        with_acmix: bool,
        norm_cfg: dict,
        with_cp: bool,
    ) -> None:
        super().__init__()
        width = channels // 4
        self.bn1 = build_norm_layer(norm_cfg, channels)[1]
        self.sam = PatchwiseSelfAttention(
            channels,
            channels // 16,
            width,
            share_channels,
            kernel_size,
            with_acmix,
            norm_cfg,
        )
        self.bn2 = build_norm_layer(norm_cfg, width)[1]
        self.conv = nn.Conv2d(width, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.with_cp = with_cp

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(x))
        out = self.relu(self.bn2(self.sam(out)))
        return self.conv(out)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad:
            return x + cp.checkpoint(self.residual, x, use_reentrant=False)
        return x + self.residual(x)


def _valid_custom_arch(arch: Mapping) -> bool:
    """Five stages (0 to 4) of blocks and odd window sizes."""
    sizes = arch['kernel_sizes']
    return (
        len(arch['blocks']) == NUM_STAGES + 1
        and len(sizes) == NUM_STAGES + 1
        and all(k >= 1 and k % 2 for k in sizes)
    )


@MODELS.register_module()
class ACmixSAN(FrozenStagesMixin, BaseModule):
    """ACmix-SAN backbone: patchwise SAN-10/15/19 with ACmix in every SAM.

    See the module docstring for the design. Module names are those of the
    reference SAN (``conv_in``, ``bn_in``, ``conv0``...``conv4``,
    ``layer0``...``layer4``, ``bn0``...``bn4``, ``layerX.Y.sam.conv_w``...),
    with the ACmix parameters under ``layerX.Y.sam.acmix``.

    Args:
        arch (int | dict): 10, 15 or 19, or a dict with ``blocks`` and
            ``kernel_sizes``, five entries each (stage 0 to 4). Defaults to
            10.
        in_channels (int): Image channels. Defaults to 3.
        with_acmix (bool): False builds the plain patchwise SAN. Defaults to
            True.
        share_channels (int): Channels sharing one attention weight.
            Defaults to 8.
        out_indices (Sequence[int]): Stages (0 to 3: strides 4 to 32) whose
            outputs are returned. Defaults to (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze (no gradient, eval mode); -1
            freezes nothing, 0 the stem (with SAN's stage 0), ``i`` the stem
            and stages 1 to ``i``. Defaults to -1.
        norm_cfg (dict): Normalisation config. Defaults to
            ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep BN layers in eval mode while training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to
            False.
        zero_init_residual (bool): Start every block as the identity by
            zeroing its last convolution, as mmdet's ResNet does with its
            last norm. SAN itself does not; but without it a randomly
            initialised SAN whose norms keep their initial statistics
            (``norm_eval``) grows by orders of magnitude a block and
            overflows. Defaults to True.
        init_cfg (dict | list[dict], optional): Initialisation config; a
            ``dict(type='Pretrained', checkpoint=..., prefix=...)`` entry is
            loaded with strict key matching. Defaults to Kaiming for convs
            and constant 1 for norms.

    Example:
        >>> import torch
        >>> model = ACmixSAN(arch=10).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 95))]
        [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    """

    arch_zoo = {
        10: dict(blocks=(2, 1, 2, 4, 1), kernel_sizes=(3, 7, 7, 7, 7)),
        15: dict(blocks=(3, 2, 3, 5, 2), kernel_sizes=(3, 7, 7, 7, 7)),
        19: dict(blocks=(3, 3, 4, 6, 3), kernel_sizes=(3, 7, 7, 7, 7)),
    }

    def __init__(
        self,
        arch: int | dict = 10,
        in_channels: int = 3,
        with_acmix: bool = True,
        share_channels: int = 8,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_cfg: dict | None = None,
        norm_eval: bool = False,
        with_cp: bool = False,
        zero_init_residual: bool = True,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        if init_cfg is None:
            init_cfg = conv_net_init_cfg()
        super().__init__(init_cfg=init_cfg)
        settings = arch_settings(
            type(self),
            arch,
            ('blocks', 'kernel_sizes'),
            _valid_custom_arch,
            'five entries each, odd kernel sizes',
        )
        self.out_indices = stage_arguments(
            NUM_STAGES, out_indices, frozen_stages
        )
        self.in_channels = in_channels
        self.with_acmix = with_acmix
        self.frozen_stages = frozen_stages
        self.norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual

        self.conv_in = nn.Conv2d(in_channels, STEM_CHANNELS, 1, bias=False)
        self.bn_in = build_norm_layer(self.norm_cfg, STEM_CHANNELS)[1]
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        channels = STEM_CHANNELS
        widths = [STEM_CHANNELS] + [256 * 2**i for i in range(NUM_STAGES)]
        stages = zip(widths, settings['blocks'], settings['kernel_sizes'])
        for index, (width, blocks, kernel_size) in enumerate(stages):
            self.add_module(
                f'conv{index}', nn.Conv2d(channels, width, 1, bias=False)
            )
            layer = [
                SANBottleneck(
                    width,
                    kernel_size,
                    share_channels,
                    with_acmix,
                    self.norm_cfg,
                    with_cp,
                )
                for _ in range(blocks)
            ]
            self.add_module(f'layer{index}', Sequential(*layer))
            self.add_module(
                f'bn{index}', build_norm_layer(self.norm_cfg, width)[1]
            )
            channels = width
        self.out_channels = widths[1:]
        self._freeze_stages()

    def _stage_modules(self, index: int) -> list[nn.Module]:
        """Stem (``index`` 0, with SAN's stage 0) or output stage ``index``
        (1 to 4)."""
        modules = [
            getattr(self, f'{name}{index}') for name in ('conv', 'layer', 'bn')
        ]
        return [self.conv_in, self.bn_in] + modules if index == 0 else modules

    def init_weights(self) -> None:
        """Initialises from ``init_cfg``, then zeroes the residual ends; a
        ``Pretrained`` entry is loaded last, with strict key matching (see
        :func:`init_weights_strictly`).
        """
        init_weights_strictly(self, super().init_weights, self._zero_init)

    def _zero_init(self) -> None:
        if self.zero_init_residual:
            for block in self.modules():
                if isinstance(block, SANBottleneck):
                    nn.init.zeros_(block.conv.weight)
                    nn.init.zeros_(block.conv.bias)

    def _freeze_stages(self) -> None:
        for index in range(self.frozen_stages + 1):
            freeze(self._stage_modules(index))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Returns the outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): ``(B, in_channels, H, W)`` images; any H and W.

        Returns:
            tuple[Tensor]: NCHW maps at strides 4, 8, 16, 32 (``ceil(H /
            stride)`` rows), with 256, 512, 1024, 2048 channels.
        """
        check_image_batch(x, self.in_channels, type(self).__name__)
        x = self.relu(self.bn_in(self.conv_in(x)))
        outs = []
        for index in range(NUM_STAGES + 1):
            conv, layer, norm = self._stage_modules(index)[-3:]
            x = self.relu(norm(layer(conv(self.pool(x)))))
            if index - 1 in self.out_indices:
                outs.append(x)
        return tuple(outs)
