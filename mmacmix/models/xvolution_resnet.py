"""X-volution ResNet: a ResNet v1.5 with X-volutions in chosen stages.

The paper puts X-volution into ResNet stage 3 (ImageNet: ResNet-34 +1.2,
ResNet-50 +0.9 top-1; COCO: +1.7 box AP over ResNet-50). Every other module
is torchvision's ResNet's, so its ImageNet weights map directly (see
:func:`~mmacmix.models.converters.convert_resnet_to_xvolution`).
"""

from collections.abc import Sequence

from torch import nn

from mmacmix.registry import MODELS

from .resnet import BasicBlock, Bottleneck, PluggableResNet, ResidualBlock
from .utils import stage_flags
from .xvolution import XVolution


def _drop_norms_after_xvolutions(block: ResidualBlock) -> None:
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
        attention (str): The X-volutions' attention branch: ``'pssa'``
            (pixel shift self-attention) or ``'global'`` (the paper's
            X-volution (SA): multi-head self-attention over all positions,
            which cannot be deployed). Defaults to ``'pssa'``.
        num_heads (int): Heads of the global attention. Defaults to 4.
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
        attention: str = 'pssa',
        num_heads: int = 4,
        deploy: bool = False,
        **kwargs,
    ) -> None:
        self.xvolution_stages = stage_flags(
            'xvolution_stages', xvolution_stages
        )
        self.attention = attention
        self.num_heads = num_heads
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
            attention=self.attention,
            num_heads=self.num_heads,
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
                    norm = getattr(last, f'{last.attention_branch}_bn')
                    nn.init.zeros_(norm.weight)

    def switch_to_deploy(self) -> None:
        """Turns every X-volution into its deployed form, in place.

        In eval mode the outputs do not change (up to rounding); frozen
        stages stay frozen.

        Raises:
            ValueError: With ``attention='global'``, which has no deployed
                form.
        """
        for module in self.modules():
            if isinstance(module, XVolution):
                module.switch_to_deploy()
        self.deploy = True
        self._freeze_stages()
