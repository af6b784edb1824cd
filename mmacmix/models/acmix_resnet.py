"""ACmix-ResNet: ResNet v1.5 with every 3x3 convolution replaced by ACmix.

The official ImageNet models (``ResNet/ResNet_ImageNet.py``) replace the
middle convolution of every bottleneck, in all four stages, by
``ACmix(width, width, kernel_att=7, head=4, kernel_conv=3, stride)``. Their
training checkpoints hold ``{'state_dict': ...}`` with ``module.``-prefixed
keys and a 1000-class ``fc`` head; :func:`convert_acmix_resnet` turns one
into weights for :class:`ACmixResNet`.
"""

from collections.abc import Mapping

from torch import Tensor, nn

from mmacmix.registry import MODELS

from .acmix import ACmix
from .resnet import Bottleneck, PluggableResNet
from .utils import describe_keys


@MODELS.register_module()
class ACmixResNet(PluggableResNet):
    """ACmix-ResNet backbone (depth 26, 38 or 50).

    Every bottleneck's 3x3 convolution is an :class:`ACmix` op with 4 heads
    and a 7x7 attention window, as in the official models. Unlike the
    official ResNet, whose Kaiming initialisation overwrites them, the one-hot
    shift kernels and rates of 0.5 are kept at initialisation.

    Args:
        depth (int): 26, 38 or 50.
        num_heads (int): Heads of every ACmix op. Defaults to 4.
        attn_kernel_size (int): Attention window side. Defaults to 7.
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
        **kwargs,
    ) -> None:
        self.num_heads = num_heads
        self.attn_kernel_size = attn_kernel_size
        super().__init__(depth, **kwargs)

    def make_conv3x3(
        self, stage: int, in_channels: int, out_channels: int, stride: int
    ) -> nn.Module:
        return ACmix(
            in_channels,
            out_channels,
            stride=stride,
            num_heads=self.num_heads,
            attn_kernel_size=self.attn_kernel_size,
        )


def convert_acmix_resnet(
    checkpoint: Mapping, model: nn.Module | None = None
) -> dict[str, Tensor]:
    """Converts an official ACmix-ResNet training checkpoint.

    Args:
        checkpoint (Mapping): ``{'state_dict': ...}`` as saved by the official
            ``main.py`` (``module.`` key prefix, ``fc`` classifier), or a bare
            state dict.
        model (nn.Module, optional): The :class:`ACmixResNet` the weights are
            for; by default one is built with the depth read from the keys.

    Returns:
        dict[str, Tensor]: The backbone's state dict, without prefix.

    Raises:
        KeyError: If keys are missing or unknown (all are named).
        ValueError: If the checkpoint is no ACmix-ResNet of a known depth.
    """
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError('the checkpoint holds no state dict')
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix('module.')
        if key.startswith('fc.'):
            continue  # the ImageNet classifier
        converted[key] = value
    if model is None:
        model = ACmixResNet(depth=_depth_of(converted))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unknown = sorted(set(converted) - set(expected))
    if missing or unknown:
        raise KeyError(
            f'not an ACmix-ResNet-{getattr(model, "depth", "?")} checkpoint: '
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


def _depth_of(state_dict: Mapping[str, Tensor]) -> int:
    """Reads the depth from the number of blocks per stage."""
    blocks = []
    for stage in range(1, 5):
        indices = {
            key.split('.')[1]
            for key in state_dict
            if key.startswith(f'layer{stage}.')
        }
        blocks.append(len(indices))
    for depth, (_, stage_blocks) in ACmixResNet.arch_settings.items():
        if tuple(blocks) == stage_blocks:
            if not any(k.endswith('conv2.rate1') for k in state_dict):
                raise KeyError(
                    'not an ACmix checkpoint: no ACmix key (layerX.Y.conv2.'
                    '{rate1, rate2, fc.weight, dep_conv.weight, conv_p.*}) '
                    'was found; plain ResNet weights cannot be converted'
                )
            return depth
    valid = {d: s for d, (_, s) in ACmixResNet.arch_settings.items()}
    raise ValueError(
        f'blocks per stage {tuple(blocks)} match no '
        f'ACmix-ResNet depth; valid: {valid}'
    )
