"""ACmix-ResNet: ResNet v1.5 with every 3x3 convolution replaced by ACmix.

The official ImageNet models (``ResNet/ResNet_ImageNet.py``) replace the
middle convolution of every bottleneck, in all four stages, by
``ACmix(width, width, kernel_att=7, head=4, kernel_conv=3, stride)``. Their
training checkpoints hold ``{'state_dict': ...}`` with ``module.``-prefixed
keys and a 1000-class ``fc`` head; ``convert_acmix_resnet`` in
:mod:`mmacmix.models.converters` turns one into weights for
:class:`ACmixResNet`.

With ``acmix_stages=(False,) * 4`` the same class is the plain ResNet of
that depth (the control the demo's ``--compare`` trains).
"""

from collections.abc import Sequence

from torch import nn

from mmacmix.registry import MODELS

from .acmix import ACmix
from .resnet import Bottleneck, PluggableResNet
from .utils import stage_flags


@MODELS.register_module()
class ACmixResNet(PluggableResNet):
    """ACmix-ResNet backbone (depth 26, 38 or 50).

    Every bottleneck's 3x3 convolution is an :class:`ACmix` op with 4 heads
    and a 7x7 attention window, as in the official models (or only those of
    the stages ``acmix_stages`` chooses). Unlike the
    official ResNet, whose Kaiming initialisation overwrites them, the one-hot
    shift kernels and rates of 0.5 are kept at initialisation.

    Args:
        depth (int): 26, 38 or 50.
        num_heads (int): Heads of every ACmix op. Defaults to 4.
        attn_kernel_size (int): Attention window side. Defaults to 7.
        acmix_stages (Sequence[bool]): For each of the four stages, whether
            its 3x3 convolutions are ACmix ops; a stage without keeps the
            plain 3x3 convolution (so all False is the plain ResNet of that
            depth, same module names elsewhere). Defaults to
            ``(True, True, True, True)``, the official models.
        **kwargs: The arguments of :class:`PluggableResNet` (``out_indices``,
            ``frozen_stages``, ``norm_cfg``, ``norm_eval``, ``with_cp``,
            ``init_cfg``...).

    Example:
        >>> import torch
        >>> model = ACmixResNet(depth=26).eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 64, 96))]
        [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6), (1, 2048, 2, 3)]
    """

    arch_settings = {
        26: (Bottleneck, (1, 2, 4, 1)),
        38: (Bottleneck, (2, 3, 5, 2)),
        50: (Bottleneck, (3, 4, 6, 3)),
    }

    def __init__(
        self,
        depth: int,
        num_heads: int = 4,
        attn_kernel_size: int = 7,
        acmix_stages: Sequence[bool] = (True, True, True, True),
        **kwargs,
    ) -> None:
        self.acmix_stages = stage_flags('acmix_stages', acmix_stages)
        self.num_heads = num_heads
        self.attn_kernel_size = attn_kernel_size
        super().__init__(depth, **kwargs)

    def make_conv3x3(
        self, stage: int, in_channels: int, out_channels: int, stride: int
    ) -> nn.Module:
        if not self.acmix_stages[stage]:
            return super().make_conv3x3(
                stage, in_channels, out_channels, stride
            )
        return ACmix(
            in_channels,
            out_channels,
            stride=stride,
            num_heads=self.num_heads,
            attn_kernel_size=self.attn_kernel_size,
        )
