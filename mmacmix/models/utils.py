"""Helpers shared by the backbones and operators.

Strict pretrained loading, the argument checks every family repeats
(image batches, the ``nn.Conv2d`` signature of the drop-in operators, the
backbones' ``arch``, ``out_indices``, ``frozen_stages`` and per-stage
flags), freezing, and the patch embedding of the transformer backbones.
"""

import os.path as osp
from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmacmix.checkpoint import (
    KeyMismatchError,
    describe_keys,
    load_state_dict_strictly,
    read_checkpoint,
    state_dict_of,
)


def conv_net_init_cfg() -> list[dict]:
    """The default ``init_cfg`` of the convolutional backbones (ResNets,
    SAN): Kaiming for convolutions, constant 1 for norms; a new list on
    every call, so that no two models share one."""
    return [
        dict(type='Kaiming', layer='Conv2d'),
        dict(type='Constant', val=1, layer=['_BatchNorm', 'GroupNorm']),
    ]


def init_weights_strictly(
    module: nn.Module,
    base_init_weights: Callable[[], None],
    after_init: Callable[[], None] | None = None,
) -> None:
    """Runs a BaseModule's ``init_weights`` with a strict ``Pretrained`` step.

    MMEngine loads ``init_cfg=dict(type='Pretrained', ...)`` with
    ``strict=False``, which hides converter mistakes behind a log line. Here
    every other ``init_cfg`` entry runs first (through ``base_init_weights``),
    then ``after_init``, then the pretrained weights are loaded with
    :func:`load_pretrained`, which fails on any missing or unexpected key.

    Args:
        module (nn.Module): A BaseModule whose ``init_cfg`` is read.
        base_init_weights (callable): The parent class's ``init_weights``
            bound to ``module``.
        after_init (callable, optional): Run after the plain initialisation
            and before pretrained weights (e.g. zeroing residual branches).
    """
    full_cfg = module.init_cfg
    cfgs = full_cfg if isinstance(full_cfg, list) else [full_cfg]
    pretrained = [c for c in cfgs if c and c.get('type') == 'Pretrained']
    module.init_cfg = [c for c in cfgs if c and c not in pretrained] or None
    try:
        base_init_weights()
    finally:
        module.init_cfg = full_cfg
    if after_init is not None:
        after_init()
    for cfg in pretrained:
        load_pretrained(module, cfg['checkpoint'], cfg.get('prefix'))


def load_pretrained(
    module: nn.Module, checkpoint: str, prefix: str | None = None
) -> None:
    """Loads a checkpoint into ``module`` with strict key matching.

    Args:
        module (nn.Module): The model to load into.
        checkpoint (str): A local path or any URL MMEngine can read. The file
            holds a state dict, or a dict with it under ``'state_dict'``.
        prefix (str, optional): Only keys starting with it are loaded, with
            it removed (``'backbone.'`` for a detector checkpoint or one our
            converters wrote). Defaults to None (all keys).

    Raises:
        FileNotFoundError: If a local ``checkpoint`` does not exist.
        KeyMismatchError: If the prefix matches nothing, or keys are
            missing or unexpected (the first are named, with what the file
            seems to hold).
    """
    state_dict = found = read_state_dict(checkpoint)
    if prefix:
        state_dict = {
            key[len(prefix) :]: value
            for key, value in found.items()
            if key.startswith(prefix)
        }
        if not state_dict:
            raise KeyMismatchError(
                f'no key of {checkpoint} starts with the prefix {prefix!r}; '
                'its keys start with '
                f'{describe_keys(sorted({k.split(".")[0] for k in found}))}'
                ': give one of these as prefix, or none if the file holds '
                'this module alone'
            )
    load_state_dict_strictly(module, state_dict, checkpoint)


def read_state_dict(checkpoint: str) -> Mapping[str, Tensor]:
    """Reads the state dict of a checkpoint file or URL.

    Read by :func:`mmacmix.checkpoint.read_checkpoint`: with
    ``weights_only=True`` unless inside ``trusted_checkpoints()``.

    Raises:
        FileNotFoundError: If a local ``checkpoint`` does not exist.
        ValueError: If it is unreadable, holds no state dict or needs more
            than weights.
    """
    if '://' not in checkpoint and not osp.exists(checkpoint):
        raise FileNotFoundError(
            f'pretrained checkpoint {checkpoint!r} does not exist; '
            'convert the official weights first (see '
            'docs/en/converting_checkpoints.md)'
        )
    return state_dict_of(read_checkpoint(checkpoint), checkpoint)


def square_argument(owner: str, name: str, value: int | Sequence[int]) -> int:
    """Reads a conv argument given as an int or a square pair, like convs.

    Raises:
        ValueError: If ``value`` is a non-square pair (names ``owner``).
    """
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(
                f'{owner} supports only square {name}, got {name}={value!r}'
            )
        value = value[0]
    return value


def check_image_batch(x: Tensor, channels: int, owner: str) -> None:
    """Raises ``ValueError`` unless ``x`` is ``(B, channels, H, W)``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f'{owner} expects a 4-D (B, {channels}, H, W) tensor, got shape '
            f'{tuple(x.shape)}'
        )


def conv3x3_arguments(
    owner: str,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    strides: Sequence[int] | None = None,
    dilations: Sequence[int] | None = None,
) -> tuple[int, int]:
    """Checks the ``nn.Conv2d`` arguments of an op that replaces a 3x3 conv.

    Accepted: ints or square pairs; ``kernel_size`` 3; positive integer
    ``stride`` and ``dilation`` (among ``strides`` and ``dilations`` when
    given); ``padding`` equal to ``dilation``, the padding that keeps the
    size; ``groups`` 1.

    Args:
        owner (str): The op's name, for the messages.
        kernel_size, stride, padding, dilation, groups: As ``nn.Conv2d``'s.
        strides (Sequence[int], optional): The strides the op supports.
            Defaults to None (any).
        dilations (Sequence[int], optional): The dilations it supports.
            Defaults to None (any).

    Returns:
        tuple[int, int]: ``stride`` and ``dilation``.

    Raises:
        ValueError: Naming the first argument that is not accepted and what
            would be.
    """
    kernel_size = square_argument(owner, 'kernel_size', kernel_size)
    stride = square_argument(owner, 'stride', stride)
    padding = square_argument(owner, 'padding', padding)
    dilation = square_argument(owner, 'dilation', dilation)
    for name, value, supported in (
        ('kernel_size', kernel_size, (3,)),
        ('groups', groups, (1,)),
        ('stride', stride, strides),
        ('dilation', dilation, dilations),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f'{owner} needs a positive integer {name}, '
                f'got {name}={value!r}'
            )
        if supported is not None and value not in supported:
            allowed = (
                f'only {name}={supported[0]}'
                if len(supported) == 1
                else f'{name} {" or ".join(map(str, supported))}'
            )
            raise ValueError(
                f'{owner} supports {allowed}, got {name}={value!r}'
            )
    if padding != dilation:
        raise ValueError(
            f'{owner} supports only padding={dilation} at dilation '
            f'{dilation} (the padding that keeps the size), got '
            f'padding={padding!r}'
        )
    return stride, dilation


def arch_settings(
    owner: type,
    arch: str | int | Mapping,
    keys: Sequence[str],
    check: Callable[[Mapping], bool] | None = None,
    requirement: str = '',
) -> dict:
    """Reads a backbone's ``arch``: a key of ``owner.arch_zoo`` (names in
    any case, or numbers such as SAN's depths) or a dict with exactly
    ``keys``.

    Args:
        owner (type): The backbone class, with its ``arch_zoo``.
        arch (str | int | Mapping): The ``arch`` argument.
        keys (Sequence[str]): The keys a custom arch must have.
        check (callable, optional): Whether a custom arch with those keys
            is valid beyond its keys. Defaults to None (any is).
        requirement (str): What ``check`` asks, for the message (``'five
            entries each'``). Defaults to ''.

    Raises:
        ValueError: Naming the valid names, keys and requirement.
    """
    if isinstance(arch, Mapping):
        if set(arch) != set(keys) or (check is not None and not check(arch)):
            rule = f', {requirement}' if requirement else ''
            raise ValueError(
                f'a custom arch must be a dict with exactly the keys '
                f'{sorted(keys)}{rule}; got {arch!r}'
            )
        return dict(arch)
    name = arch.lower() if isinstance(arch, str) else arch
    if name not in owner.arch_zoo:
        raise ValueError(
            f'unknown arch {arch!r} for {owner.__name__}; valid names '
            f'are {sorted(owner.arch_zoo)} or a dict with keys '
            f'{sorted(keys)}'
        )
    return dict(owner.arch_zoo[name])


def stage_arguments(
    num_stages: int, out_indices: Sequence[int], frozen_stages: int
) -> tuple[int, ...]:
    """Checks mmdet's ``out_indices`` and ``frozen_stages`` of a backbone
    with ``num_stages`` stages; returns ``out_indices`` as a tuple.

    Raises:
        ValueError: Saying which range is accepted.
    """
    out_indices = tuple(out_indices)
    if not out_indices or not all(0 <= i < num_stages for i in out_indices):
        raise ValueError(
            f'out_indices must be indices in [0, {num_stages}), got '
            f'{out_indices}'
        )
    if not -1 <= frozen_stages <= num_stages:
        raise ValueError(
            f'frozen_stages must lie in [-1, {num_stages}], got '
            f'{frozen_stages}'
        )
    return out_indices


def stage_flags(
    name: str, flags: Sequence[bool], num_stages: int = 4
) -> tuple[bool, ...]:
    """Checks a per-stage switch such as ``acmix_stages``: a sequence of
    ``num_stages`` booleans; returns it as a tuple.

    Raises:
        ValueError: Naming ``name``, what is accepted and what was given.
    """
    if (
        not isinstance(flags, Sequence)
        or isinstance(flags, str)
        or len(flags) != num_stages
    ):
        raise ValueError(
            f'{name} needs one flag per stage ({num_stages}), got {flags!r}'
        )
    if not all(isinstance(flag, bool) for flag in flags):
        raise ValueError(f'{name} must hold True or False, got {flags!r}')
    return tuple(flags)


def freeze(modules: Sequence[nn.Module]) -> None:
    """Puts ``modules`` in eval mode and stops their parameters' gradients
    (mmdet's ``frozen_stages``)."""
    for module in modules:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False


def eval_norms(module: nn.Module) -> None:
    """Puts every normalisation layer of ``module`` in eval mode (mmdet's
    ``norm_eval``)."""
    for layer in module.modules():
        if isinstance(layer, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            layer.eval()


class FrozenStagesMixin:
    """``train()`` for backbones with mmdet's ``frozen_stages`` and
    ``norm_eval``: frozen stages (and, with ``norm_eval``, every
    normalisation layer) stay in eval mode. The backbone (listed before
    ``BaseModule``) defines ``_freeze_stages()`` and ``norm_eval``."""

    def train(self, mode: bool = True) -> nn.Module:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            eval_norms(self)
        return self


class PatchEmbed(BaseModule):
    """Non-overlapping ``patch_size`` patches, projected and normalised.

    Sides that are no multiple of ``patch_size`` are zero-padded at the
    bottom and right first (mmcv's ``AdaptivePadding`` in ``'corner'``
    mode), so no pixel is dropped (mmdet's PVT drops them).

    Args:
        in_channels (int): Input channels.
        embed_dims (int): Output channels.
        patch_size (int): Side of a patch, and stride.
        eps (float): The LayerNorm's epsilon. Defaults to 1e-5.
        proj_name (str): Attribute (state-dict) name of the projection:
            ``'proj'`` as the official Swin stores it, ``'projection'`` as
            mmdet's PVT does. Defaults to ``'proj'``.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dims: int,
        patch_size: int,
        eps: float = 1e-5,
        proj_name: str = 'proj',
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj_name = proj_name
        projection = nn.Conv2d(
            in_channels, embed_dims, patch_size, stride=patch_size
        )
        self.add_module(proj_name, projection)
        self.norm = nn.LayerNorm(embed_dims, eps=eps)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Returns ``(B, H' * W', C)`` tokens and ``(H', W')``."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.patch_size, 0, -h % self.patch_size))
        x = getattr(self, self.proj_name)(x)
        hw_shape = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw_shape
