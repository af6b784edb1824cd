"""A torchvision-style ResNet (v1.5) whose 3x3 convolutions are pluggable.

ACmix-ResNet and X-volution ResNet differ from a plain ResNet only in the
operator that takes the place of some 3x3 convolutions, so both subclass
:class:`PluggableResNet` and override :meth:`PluggableResNet.make_conv3x3`.
Module names (``conv1``, ``bn1``, ``layer1.0.conv2``, ``downsample.0``...) are
torchvision's and mmdet's, so ImageNet checkpoints map without renaming, and
the constructor takes the arguments of mmdet's ``ResNet``.
"""

import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_conv_layer, build_norm_layer
from mmengine.model import BaseModule, Sequential
from torch import Tensor

from .utils import (
    FrozenStagesMixin,
    check_image_batch,
    conv_net_init_cfg,
    freeze,
    init_weights_strictly,
    stage_arguments,
)


class ResidualBlock(BaseModule):
    """What both blocks share: the shortcut and an optionally recomputed
    residual branch.

    Args:
        downsample (nn.Module, optional): Projection of the shortcut.
        with_cp (bool): Recompute the residual branch in backward to save
            memory.
    """

    expansion = 1

    def __init__(self, downsample: nn.Module | None, with_cp: bool) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.with_cp = with_cp

    @property
    def last_norm(self) -> nn.Module:
        """The norm that ends the residual branch (zeroed at init)."""
        raise NotImplementedError

    def residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(self.residual, x, use_reentrant=False)
        else:
            out = self.residual(x)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Args:
        in_channels (int): Input channels.
        planes (int): Channels of both convolutions.
        stride (int): Stride of the first convolution.
        downsample (nn.Module, optional): Projection of the shortcut.
        conv3x3 (callable): ``conv3x3(in, out, stride)`` builds a 3x3 conv.
        norm_cfg (dict): Normalisation layer config.
        with_cp (bool): Recompute the block in backward to save memory.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        conv3x3,
        norm_cfg: dict,
        with_cp: bool,
    ) -> None:
        super().__init__(downsample, with_cp)
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = build_norm_layer(norm_cfg, planes)[1]
        self.conv2 = conv3x3(planes, planes, 1)
        self.bn2 = build_norm_layer(norm_cfg, planes)[1]

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(ResidualBlock):
    """1x1, 3x3 (strided, pluggable), 1x1 with a residual (ResNet v1.5).

    Args: as :class:`BasicBlock`; the output has ``4 * planes`` channels.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        downsample: nn.Module | None,
        conv3x3,
        norm_cfg: dict,
        with_cp: bool,
    ) -> None:
        super().__init__(downsample, with_cp)
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = build_norm_layer(norm_cfg, planes)[1]
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = build_norm_layer(norm_cfg, planes)[1]
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = build_norm_layer(norm_cfg, out_channels)[1]

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PluggableResNet(FrozenStagesMixin, BaseModule):
    """ResNet backbone with the API of mmdet's ``ResNet``.

    Subclasses set :attr:`arch_settings` (depth -> block and blocks per
    stage) and override :meth:`make_conv3x3`.

    Args:
        depth (int): One of :attr:`arch_settings`.
        in_channels (int): Image channels. Defaults to 3.
        out_indices (Sequence[int]): Stages whose outputs are returned, at
            least one. Defaults to (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze (no gradient, eval mode); -1
            freezes nothing, 0 the stem, ``i`` the stem and stages 1 to
            ``i``. Defaults to -1.
        conv_cfg (dict, optional): Config of the plain convolutions.
            Defaults to None (``nn.Conv2d``).
        norm_cfg (dict): Normalisation config. Defaults to
            ``dict(type='BN', requires_grad=True)``.
        norm_eval (bool): Keep the normalisation layers in eval mode (frozen
            statistics) while training. Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to
            False.
        zero_init_residual (bool): Start every residual branch at zero by
            zeroing its last norm's weight. Defaults to True.
        init_cfg (dict | list[dict], optional): Initialisation config; a
            ``dict(type='Pretrained', checkpoint=..., prefix=...)`` entry is
            loaded with strict key matching. Defaults to Kaiming for convs
            and constant 1 for norms.
    """

    arch_settings: dict[int, tuple[type[ResidualBlock], tuple[int, ...]]] = {}

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        out_indices: tuple[int, ...] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        norm_eval: bool = False,
        with_cp: bool = False,
        zero_init_residual: bool = True,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        if init_cfg is None:
            init_cfg = conv_net_init_cfg()
        super().__init__(init_cfg=init_cfg)
        if depth not in self.arch_settings:
            raise ValueError(
                f'invalid depth {depth!r} for {type(self).__name__}; valid '
                f'depths are {sorted(self.arch_settings)}'
            )
        block, stage_blocks = self.arch_settings[depth]
        self.out_indices = stage_arguments(
            len(stage_blocks), out_indices, frozen_stages
        )
        self.depth = depth
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        self.norm_eval = norm_eval
        self.zero_init_residual = zero_init_residual

        self.conv1 = build_conv_layer(
            conv_cfg, in_channels, 64, 7, stride=2, padding=3, bias=False
        )
        self.bn1 = build_norm_layer(self.norm_cfg, 64)[1]
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        channels = 64
        self.out_channels = []
        for stage, num_blocks in enumerate(stage_blocks):
            planes = 64 * 2**stage
            layer = []
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                out_channels = planes * block.expansion
                downsample = None
                if stride != 1 or channels != out_channels:
                    downsample = Sequential(
                        build_conv_layer(
                            conv_cfg,
                            channels,
                            out_channels,
                            1,
                            stride=stride,
                            bias=False,
                        ),
                        build_norm_layer(self.norm_cfg, out_channels)[1],
                    )

                def conv3x3(cin: int, cout: int, s: int, stage=stage):
                    return self.make_conv3x3(stage, cin, cout, s)

                layer.append(
                    block(
                        channels,
                        planes,
                        stride,
                        downsample,
                        conv3x3,
                        self.norm_cfg,
                        with_cp,
                    )
                )
                channels = out_channels
            self.add_module(f'layer{stage + 1}', Sequential(*layer))
            self.out_channels.append(channels)
        self._freeze_stages()

    def make_conv3x3(
        self, stage: int, in_channels: int, out_channels: int, stride: int
    ) -> nn.Module:
        """Builds the 3x3 convolution of a block in ``stage`` (0-based)."""
        return build_conv_layer(
            self.conv_cfg,
            in_channels,
            out_channels,
            3,
            stride=stride,
            padding=1,
            bias=False,
        )

    @property
    def res_layers(self) -> list[nn.Module]:
        return [getattr(self, f'layer{i + 1}') for i in range(4)]

    def init_weights(self) -> None:
        """Initialises from ``init_cfg``, then zeroes the residual ends.

        A ``Pretrained`` entry of ``init_cfg`` is loaded last, with strict
        key matching (see :func:`init_weights_strictly`).
        """
        init_weights_strictly(self, super().init_weights, self._zero_init)

    def _zero_init(self) -> None:
        if self.zero_init_residual:
            for layer in self.res_layers:
                for block in layer:
                    nn.init.zeros_(block.last_norm.weight)

    def _freeze_stages(self) -> None:
        modules = []
        if self.frozen_stages >= 0:
            modules += [self.conv1, self.bn1]
        freeze(modules + self.res_layers[: max(self.frozen_stages, 0)])

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Returns the outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): ``(B, in_channels, H, W)`` images; any H and W.

        Returns:
            tuple[Tensor]: NCHW maps at strides 4, 8, 16, 32.
        """
        check_image_batch(x, self.in_channels, type(self).__name__)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for index, layer in enumerate(self.res_layers):
            x = layer(x)
            if index in self.out_indices:
                outs.append(x)
        return tuple(outs)
