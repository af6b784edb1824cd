"""Checkpoint converters: pure functions from a source checkpoint to the
state dict of one of our backbones.

Every converter reads the source with
:func:`mmacmix.checkpoint.state_dict_of` (the one reader of every format),
renames keys, and checks the result against the target model with
:func:`check_converted`, so a missing, unknown or misshapen key is an error
that names it, never a silent skip. The command lines in
``tools/model_converters/`` wrap them (see :func:`mmacmix.cli.convert_cli`).
"""

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmacmix.checkpoint import state_dict_of

from .acmix_pvt import ACmixPVT
from .acmix_resnet import ACmixResNet
from .acmix_swin import ACMIX_KEYS, ACmixSwinTransformer
from .resnet import Bottleneck
from .utils import describe_keys
from .xvolution import XVolution
from .xvolution_resnet import XVolutionResNet


def check_converted(
    converted: Mapping[str, Tensor],
    expected: Mapping[str, Tensor],
    target: str,
    source_names: Mapping[str, str] | None = None,
) -> None:
    """Checks that converted weights are exactly those a model expects.

    Args:
        converted (Mapping[str, Tensor]): The converter's result.
        expected (Mapping[str, Tensor]): The target model's state dict.
        target (str): What the weights are for, for the messages.
        source_names (Mapping[str, str], optional): Target key -> source
            key, for keys the converter renamed: messages name what the
            user's file lacks.

    Raises:
        KeyError: If keys are missing or unknown (all are named).
        ValueError: If a shape differs.
    """
    source_names = source_names or {}
    missing = sorted(
        source_names.get(key, key) for key in set(expected) - set(converted)
    )
    unknown = sorted(set(converted) - set(expected))
    if missing or unknown:
        raise KeyError(
            f'the checkpoint does not map onto {target}: missing keys '
            f'{describe_keys(missing)}; unknown keys {describe_keys(unknown)}'
        )
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f'{source_names.get(key, key)} has shape '
                f'{tuple(value.shape)}, expected {tuple(expected[key].shape)}'
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
    converted = {
        key: value
        for key, value in state_dict_of(checkpoint).items()
        if not key.startswith('fc.')  # the ImageNet classifier
    }
    if model is None:
        if not any(key.endswith('conv2.rate1') for key in converted):
            raise KeyError(
                'not an ACmix checkpoint: no ACmix key (layerX.Y.conv2.'
                '{rate1, rate2, fc.weight, dep_conv.weight, conv_p.*}) '
                'was found; plain ResNet weights cannot be converted'
            )
        model = ACmixResNet(
            depth=_resnet_depth(converted, ACmixResNet.arch_settings)
        )
    check_converted(
        converted,
        model.state_dict(),
        f'ACmix-ResNet-{getattr(model, "depth", "?")}',
    )
    return converted


def convert_acmix_swin(
    checkpoint: Mapping,
    model: ACmixSwinTransformer | None = None,
    keep_classifier: bool = False,
) -> dict[str, Tensor]:
    """Converts an official ACmix-Swin checkpoint for
    :class:`ACmixSwinTransformer`, or for mmpretrain's ``ImageClassifier``.

    The parameter names are the official ones, so the conversion drops the
    classifier (``head.*``) and the saved buffers (``relative_position_index``
    and ``attn_mask``, computed here), and renames the final ``norm`` to the
    last stage's output norm. The official model has no output norm for the
    other stages; identity ones (weight 1, bias 0) are inserted, so that the
    converted weights load strictly and the first stages' outputs start as
    the plain layer-normalised features.

    Args:
        checkpoint (Mapping): ``{'model': state_dict, 'config': ...,
            'epoch': ...}`` as released, or a bare state dict.
        model (ACmixSwinTransformer, optional): The backbone the weights are
            for; the result has exactly its keys (output norms of the stages
            in its ``out_indices``). By default one is built with the arch,
            window, patch size and MLP ratio read from the keys and all four
            output norms.
        keep_classifier (bool): Keep the ImageNet classifier, as the state
            dict of an ``ImageClassifier`` with this backbone, a
            ``GlobalAveragePooling`` neck and a ``LinearClsHead``
            (``backbone.*``, ``head.fc.*``): mmpretrain evaluates it as
            released, and its ``backbone.`` part loads into the detection
            and segmentation configs. Defaults to False.

    Returns:
        dict[str, Tensor]: The backbone's state dict, without prefix (with
        ``keep_classifier``: the classifier's, with prefixes).

    Raises:
        KeyError: If keys are missing or unknown (all are named); a plain
            Swin checkpoint is reported as lacking the ACmix keys.
        ValueError: If the checkpoint holds no state dict or a shape differs.
    """
    converted = {
        key: value
        for key, value in state_dict_of(checkpoint).items()
        # Buffers derived from the sizes.
        if not key.endswith(('.relative_position_index', '.attn_mask'))
    }
    classifier = {
        f'head.fc.{name}': converted.pop(f'head.{name}', None)
        for name in ('weight', 'bias')
    }
    if keep_classifier and None in classifier.values():
        raise KeyError(
            'the checkpoint holds no classifier to keep (head.weight and '
            'head.bias); convert it without keeping the classifier'
        )
    if model is None:
        model = ACmixSwinTransformer(**_swin_settings(converted))
    expected = model.state_dict()
    last = len(model.layers) - 1
    source_names = {}
    for stage in model.out_indices:
        for name in ('weight', 'bias'):
            key = f'norm{stage}.{name}'
            if stage == last:
                if f'norm.{name}' in converted:
                    converted[key] = converted.pop(f'norm.{name}')
                source_names[key] = f'norm.{name}'
            else:
                identity = 1.0 if name == 'weight' else 0.0
                converted[key] = torch.full_like(expected[key], identity)
    if last not in model.out_indices:
        # The model returns no last-stage output: its norm would be unused.
        converted.pop('norm.weight', None)
        converted.pop('norm.bias', None)
    missing = sorted(set(expected) - set(converted))
    if missing and all(key.endswith(ACMIX_KEYS) for key in missing):
        raise KeyError(
            'a plain Swin checkpoint cannot be converted: the ACmix keys of '
            'every block (layers.I.blocks.J.{'
            + ', '.join(ACMIX_KEYS)
            + f'}}) are missing: {describe_keys(missing)}'
        )
    check_converted(
        converted, expected, 'this ACmix-Swin architecture', source_names
    )
    if keep_classifier:
        return {f'backbone.{k}': v for k, v in converted.items()} | classifier
    return converted


def _swin_settings(state_dict: Mapping[str, Tensor]) -> dict:
    """Reads the constructor arguments of the official model from keys."""
    needed = (
        'patch_embed.proj.weight',
        'layers.0.blocks.0.attn.relative_position_bias_table',
        'layers.0.blocks.0.mlp.fc1.weight',
    )
    absent = [key for key in needed if key not in state_dict]
    if absent:
        raise KeyError(
            f'not an ACmix-Swin checkpoint: missing keys {absent}'
            f' (keys start with {describe_keys(sorted(state_dict))})'
        )
    embed = state_dict[needed[0]]
    depths, num_heads = [], []
    stage = 0
    while f'layers.{stage}.blocks.0.norm1.weight' in state_dict:
        blocks = {
            key.split('.')[3]
            for key in state_dict
            if key.startswith(f'layers.{stage}.blocks.')
        }
        depths.append(len(blocks))
        table = state_dict[
            f'layers.{stage}.blocks.0.attn.relative_position_bias_table'
        ]
        num_heads.append(table.shape[1])
        stage += 1
    # The table has (2 * window - 1)^2 rows.
    window_size = (math.isqrt(state_dict[needed[1]].shape[0]) + 1) // 2
    return dict(
        arch=dict(
            embed_dims=embed.shape[0], depths=depths, num_heads=num_heads
        ),
        in_channels=embed.shape[1],
        patch_size=embed.shape[-1],
        window_size=window_size,
        mlp_ratio=state_dict[needed[2]].shape[0] / embed.shape[0],
        qkv_bias='layers.0.blocks.0.attn.qkv.bias' in state_dict,
    )


def convert_resnet_to_xvolution(
    checkpoint: Mapping,
    model: XVolutionResNet | None = None,
    depth: int | None = None,
    attention: str = 'pssa',
) -> dict[str, Tensor]:
    """Maps ImageNet ResNet weights onto an :class:`XVolutionResNet`.

    Every module but the X-volutions takes the ResNet's weights under the
    same name. For an X-volution at ``P`` (e.g. ``layer3.0.conv2``, in block
    ``B = layer3.0``):

    * the convolution branch is the ResNet's convolution and norm:
      ``P.conv.weight`` takes ``P.weight`` and ``P.conv_bn`` takes the norm
      after it, ``B.bn2`` (``B.bn1`` for ``conv1`` of a basic block), which
      the X-volution ResNet does not have;
    * the attention branch keeps its initialisation (seeded, so conversion
      is deterministic) and its norm starts with scale 0, shift 0 and
      running statistics 0 and 1: the branch starts switched off, so the
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
            in stage 3, the depth of the checkpoint and ``attention``.
        depth (int, optional): Expected depth; read from the keys if None.
        attention (str): The attention branch of the default model,
            ``'pssa'`` or ``'global'`` (X-volution (SA)). Defaults to
            ``'pssa'``.

    Returns:
        dict[str, Tensor]: The backbone's state dict, without prefix.

    Raises:
        KeyError: If keys are missing or unknown (all are named).
        ValueError: If the checkpoint is no ResNet of a known depth, its
            depth is not ``depth``, a shape differs, or ``model`` is
            deployed.
    """
    state_dict = state_dict_of(checkpoint)
    if any(key.startswith('backbone.') for key in state_dict):
        # OpenMMLab: the classifier or detector around the backbone goes.
        state_dict = {
            key.removeprefix('backbone.'): value
            for key, value in state_dict.items()
            if key.startswith('backbone.')
        }
    else:  # torchvision: the ImageNet classifier goes.
        state_dict = {
            key: value
            for key, value in state_dict.items()
            if not key.startswith('fc.')
        }
    found = _resnet_depth(state_dict, XVolutionResNet.arch_settings)
    if depth is not None and depth != found:
        raise ValueError(
            f'expected a ResNet-{depth}, but the checkpoint '
            f'holds a ResNet-{found}'
        )
    if model is None:
        # A fixed seed makes the attention initialisation, and so the
        # converted file, the same on every run, without touching the
        # global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = XVolutionResNet(depth=found, attention=attention)
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
    ops = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, XVolution)
    }
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
    for path, op in ops.items():
        branch = f'{path}.{op.attention_branch}'
        norm = f'{branch}_bn'
        for key, value in expected.items():
            if key.startswith(f'{branch}.'):
                converted[key] = value.clone()
        like = expected[f'{norm}.running_var']
        converted.update(
            {
                f'{norm}.weight': torch.zeros_like(like),
                f'{norm}.bias': torch.zeros_like(like),
                f'{norm}.running_mean': torch.zeros_like(like),
                f'{norm}.running_var': torch.ones_like(like),
            }
        )
        key = f'{norm}.num_batches_tracked'
        if key in expected:
            converted[key] = torch.zeros_like(expected[key])
    check_converted(converted, expected, f'XVolutionResNet-{found}')
    return converted


def _resnet_depth(
    state_dict: Mapping[str, Tensor],
    arch_settings: Mapping[int, tuple[type, tuple[int, ...]]],
) -> int:
    """Reads a ResNet's depth from its blocks per stage and block type."""
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
    for depth, (block, stage_blocks) in arch_settings.items():
        if (
            blocks == stage_blocks
            and issubclass(block, Bottleneck) == bottleneck
        ):
            return depth
    valid = {
        depth: stage_blocks
        for depth, (_, stage_blocks) in arch_settings.items()
    }
    raise ValueError(
        f'not a torchvision-style ResNet of a known depth: blocks per stage '
        f'{blocks} ({"bottleneck" if bottleneck else "basic"} blocks); '
        f'valid: {valid}'
    )


def convert_pvt_to_acmix(
    checkpoint: Mapping, model: ACmixPVT | None = None
) -> dict[str, Tensor]:
    """Maps plain PVT v1 weights onto an :class:`ACmixPVT`.

    Every plain parameter comes from the checkpoint (its classifier and
    class token are dropped, its final norm too unless the model has
    ``final_norm``). The ACmix parameters of every
    attention (``attn.fc``, ``attn.dep_conv``, ``attn.rate1``,
    ``attn.rate2``; :func:`new_acmix_pvt_keys` lists them) are new: ``fc``
    and the one-hot shift kernels as initialised (seeded, so the result is
    the same on every run), ``rate1 = 1`` and ``rate2 = 0``. The
    convolution path thus starts switched off and the converted backbone
    computes exactly the pretrained PVT; fine-tuning grows the path
    (``rate2`` gets a gradient at once).

    Args:
        checkpoint (Mapping): The original ImageNet release (whai362/PVT
            ``pvt_tiny.pth``..., the file mmdet's PVT configs load and
            convert: ``patch_embed1.proj.weight``, ``pos_embed1``,
            ``block1.0.attn.q.weight``...), or weights in the layout of
            mmdet's ``PyramidVisionTransformer`` (``layers.0.0.projection
            .weight``...), also inside a detector checkpoint (``backbone.``
            keys).
        model (ACmixPVT, optional): The backbone the weights are for; by
            default one with the architecture read from the keys (one head
            per 64 channels, as in every PVT).

    Returns:
        dict[str, Tensor]: The backbone's state dict, without prefix.

    Raises:
        KeyError: If keys are missing or unknown (all are named).
        ValueError: If the checkpoint already holds ACmix weights, or a
            shape differs.
    """
    state_dict = state_dict_of(checkpoint)
    if any(key.startswith('backbone.') for key in state_dict):
        state_dict = {
            key.removeprefix('backbone.'): value
            for key, value in state_dict.items()
            if key.startswith('backbone.')
        }
    acmix = sorted(key for key in state_dict if key.endswith(ACMIX_KEYS))
    if acmix:
        raise ValueError(
            'the checkpoint already holds ACmix weights '
            f'({describe_keys(acmix)}): load it as it is'
        )
    if 'patch_embed1.proj.weight' in state_dict:
        state_dict = _pvt_release_to_mmdet(state_dict)
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = ACmixPVT(**_pvt_settings(state_dict))
    expected = model.state_dict()
    final_norm = f'layers.{len(model.layers) - 1}.2.'
    converted = {
        key: value
        for key, value in state_dict.items()
        if key in expected or not key.startswith(final_norm)
    }
    for key in new_acmix_pvt_keys(expected):
        if key.endswith('rate1'):
            converted[key] = torch.ones_like(expected[key])
        elif key.endswith('rate2'):
            converted[key] = torch.zeros_like(expected[key])
        else:
            converted[key] = expected[key].clone()
    check_converted(converted, expected, 'this ACmix-PVT architecture')
    return converted


def new_acmix_pvt_keys(state_dict: Mapping[str, Tensor]) -> list[str]:
    """The keys of an ACmix-PVT state dict that a plain PVT lacks."""
    return [key for key in state_dict if key.endswith(ACMIX_KEYS)]


def _pvt_release_to_mmdet(
    state_dict: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Renames the original PVT's keys to those of mmdet's PVT.

    Stage ``s`` of the release (``patch_embed{s}``, ``pos_embed{s}``,
    ``block{s}.{j}``) is ``layers.{s - 1}`` (``.0``, ``.1.0``,
    ``.1.{j + 1}``); the separate ``q`` and ``kv`` projections are packed
    into ``attn.attn.in_proj_*``, ``proj`` is ``attn.attn.out_proj`` and the
    MLP's linear layers become 1x1 convolutions. The last stage's position
    embedding loses the class token's entry, and the final ``norm`` becomes
    ``layers.{s - 1}.2`` of the last stage ``s``. Unknown keys are kept as
    they are, for the key check to name.
    """
    roots = {key.partition('.')[0] for key in state_dict}
    num_stages = sum(
        re.fullmatch(r'patch_embed\d+', root) is not None for root in roots
    )
    renamed = {}
    for key, value in state_dict.items():
        root, _, rest = key.partition('.')
        if root in ('head', 'cls_token'):
            continue  # the classifier and the class token
        if root == 'norm':
            renamed[f'layers.{num_stages - 1}.2.{rest}'] = value
            continue
        staged = re.fullmatch(r'(patch_embed|pos_embed|block)(\d+)', root)
        if staged is None:
            renamed[key] = value
            continue
        kind, stage = staged[1], int(staged[2]) - 1
        if kind == 'patch_embed':
            rest = rest.replace('proj.', 'projection.')
            renamed[f'layers.{stage}.0.{rest}'] = value
        elif kind == 'pos_embed':
            last = f'patch_embed{stage + 2}.proj.weight' not in state_dict
            if last and 'cls_token' in state_dict:
                value = value[:, 1:]
            renamed[f'layers.{stage}.1.0.pos_embed'] = value
        else:
            index, _, name = rest.partition('.')
            prefix = f'layers.{stage}.1.{int(index) + 1}.'
            module, _, field = name.rpartition('.')
            q, kv = (f'{root}.{index}.attn.{p}.{field}' for p in ('q', 'kv'))
            if module in ('attn.q', 'attn.kv') and {q, kv} <= set(state_dict):
                if module == 'attn.q':
                    packed = torch.cat([value, state_dict[kv]])
                    renamed[f'{prefix}attn.attn.in_proj_{field}'] = packed
                continue
            if module in _PVT_MLP and field == 'weight':
                value = value[:, :, None, None]
            module = _PVT_RENAMES.get(module, module)
            renamed[f'{prefix}{module}.{field}'] = value
    return renamed


# Modules of a released PVT block whose mmdet names differ.
_PVT_MLP = {'mlp.fc1': 'ffn.layers.0', 'mlp.fc2': 'ffn.layers.3'}
_PVT_RENAMES = {'attn.proj': 'attn.attn.out_proj', **_PVT_MLP}


def _pvt_settings(state_dict: Mapping[str, Tensor]) -> dict:
    """Reads the constructor arguments of :class:`ACmixPVT` from the keys
    of mmdet's layout."""
    stem = 'layers.0.0.projection.weight'
    if stem not in state_dict:
        raise KeyError(
            'not a PVT checkpoint: it has neither patch_embed1.proj.weight '
            f'(original release) nor {stem} (mmdet) (keys start with '
            f'{describe_keys(sorted(state_dict))})'
        )
    embed_dims, depths, patch_sizes, sr_ratios, mlp_ratios = [], [], [], [], []
    stage = 0
    while f'layers.{stage}.0.projection.weight' in state_dict:
        projection = state_dict[f'layers.{stage}.0.projection.weight']
        block = f'layers.{stage}.1.1.'
        hidden = state_dict.get(f'{block}ffn.layers.0.weight')
        if hidden is None:
            raise KeyError(
                f'not a PVT checkpoint: {block}ffn.layers.0.weight is missing'
            )
        dims = projection.shape[0]
        embed_dims.append(dims)
        depths.append(
            len(
                {
                    key.split('.')[3]
                    for key in state_dict
                    if key.startswith(f'layers.{stage}.1.')
                }
                - {'0'}  # the position embedding
            )
        )
        patch_sizes.append(projection.shape[-1])
        reduction = state_dict.get(f'{block}attn.sr.weight')
        sr_ratios.append(1 if reduction is None else reduction.shape[-1])
        mlp_ratios.append(hidden.shape[0] / dims)
        stage += 1
    heads = [max(dims // 64, 1) for dims in embed_dims]
    grid = math.isqrt(state_dict['layers.0.1.0.pos_embed'].shape[1])
    return dict(
        arch=dict(embed_dims=embed_dims, depths=depths, num_heads=heads),
        in_channels=state_dict[stem].shape[1],
        pretrain_img_size=grid * patch_sizes[0],
        patch_sizes=patch_sizes,
        sr_ratios=sr_ratios,
        mlp_ratios=mlp_ratios,
        qkv_bias='layers.0.1.1.attn.attn.in_proj_bias' in state_dict,
    )
