"""Reading, checking and writing checkpoints, for the command-line tools.

The converters themselves are pure functions (``convert_acmix_resnet``...);
this module holds the file handling the tools share: clear errors for
unreadable input and for checkpoints that do not fit a model (saying what
the file seems to hold), and atomic, non-clobbering, reproducible output.
"""

import os.path as osp
import pickle
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from mmacmix.fileio import atomic_path, check_destination


class KeyMismatchError(KeyError):
    """A checkpoint's keys do not fit the model it is loaded into.

    A ``KeyError`` whose text is the message itself (``KeyError`` quotes
    it), so the command lines can print it as it is.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def read_checkpoint(path: str) -> Mapping:
    """Reads a checkpoint file written by ``torch.save``.

    Official checkpoints hold more than tensors (a yacs config, optimiser
    state), so they are read with ``weights_only=False``: only read files
    you trust. Objects whose class cannot be imported here (the yacs
    ``CfgNode`` of the Swin releases, when yacs is not installed) are read
    as plain dicts: the tools only need the tensors and metadata.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        IsADirectoryError: If ``path`` is a folder.
        ValueError: If the file is truncated, not a checkpoint, or holds
            something other than a dict.
    """
    if osp.isdir(path):
        raise IsADirectoryError(
            f'checkpoint {path!r} is a folder; expected a file written by '
            'torch.save'
        )
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        data = torch.load(
            path,
            map_location='cpu',
            weights_only=False,
            pickle_module=_TolerantPickle,
        )
    except Exception as error:  # torch raises many types for bad files
        # torch appends paragraphs of advice; the first sentence says it.
        found = ' '.join(str(error).split()).split('. ')[0]
        raise ValueError(
            f'{path!r} is not a readable PyTorch checkpoint (truncated or '
            f'another format: {type(error).__name__}: {found}); expected a '
            'file written by torch.save'
        ) from error
    if not isinstance(data, Mapping):
        raise ValueError(
            f'{path!r} holds a {type(data).__name__}, not a checkpoint dict; '
            "expected a state dict or a dict with one under 'state_dict'"
        )
    return data


def state_dict_of(
    checkpoint: Mapping, path: str | None = None
) -> dict[str, Tensor]:
    """Returns the weights of a checkpoint, in any format met here.

    The one reader of the converters, the pretrained loader and the tools:

    * ``{'state_dict': ..., 'meta': ...}``: MMEngine's Runner (mmdet,
      mmseg, mmpretrain), our converters, the official ACmix-ResNet
      ``main.py``;
    * ``{'model': ..., 'config': ...}``: the official Swin releases;
    * a bare state dict: torchvision.

    A ``module.`` key prefix (DataParallel, DistributedDataParallel) is
    removed, as MMEngine's ``load_checkpoint`` does.

    Args:
        checkpoint (Mapping): What :func:`read_checkpoint` returned.
        path (str, optional): The file it came from, for the message.

    Raises:
        ValueError: If it holds no state dict (tensors by name).
    """
    state = checkpoint
    for name in ('state_dict', 'model'):
        if isinstance(checkpoint.get(name), Mapping):
            state = checkpoint[name]
            break
    if (
        state
        and all(isinstance(key, str) for key in state)
        and all(isinstance(value, Tensor) for value in state.values())
    ):
        return {
            key.removeprefix('module.'): value for key, value in state.items()
        }
    keys = describe_keys(sorted(map(str, checkpoint)))
    source = repr(path) if path else 'the checkpoint'
    raise ValueError(
        f'{source} holds no state dict: found a dict with keys {keys}; '
        'expected tensors by name, or such a dict under '
        "'state_dict' (OpenMMLab) or 'model' (official Swin releases)"
    )


def describe_keys(keys: list[str], limit: int = 8) -> str:
    """Lists ``keys`` for an error message, the first ``limit`` by name."""
    if len(keys) <= limit:
        return str(keys)
    return f'{keys[:limit]} and {len(keys) - limit} more'


def load_state_dict_strictly(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str
) -> None:
    """``load_state_dict`` that explains any key or shape mismatch.

    Loading non-strictly and checking the result (rather than comparing key
    sets first) lets load-state-dict pre-hooks of the model adapt keys.

    Args:
        module (nn.Module): The model to load into.
        state_dict (Mapping[str, Tensor]): The weights.
        source (str): Where they came from (a path), for the message.

    Raises:
        KeyMismatchError: Naming the first missing, unexpected and
            misshapen keys with their counts, and what the file seems to
            hold (see :func:`mismatch_hint`).
    """
    own = module.state_dict()
    misshapen = sorted(
        key
        for key, value in state_dict.items()
        if key in own
        and isinstance(value, Tensor)
        and value.shape != own[key].shape
    )
    if misshapen:
        key = misshapen[0]
        raise KeyMismatchError(
            f'{source} does not fit {type(module).__name__}: '
            f'{len(misshapen)} tensors have another shape, e.g. {key!r} is '
            f'{tuple(state_dict[key].shape)} in the file, '
            f'{tuple(own[key].shape)} in the model '
            f'({describe_keys(misshapen, 5)}). '
            + mismatch_hint(state_dict, own)
        )
    result = module.load_state_dict(state_dict, strict=False)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise KeyMismatchError(
            f'{source} does not fit {type(module).__name__}: '
            f'{len(missing)} missing keys {describe_keys(sorted(missing), 5)}'
            f', {len(unexpected)} unexpected keys '
            f'{describe_keys(sorted(unexpected), 5)}. '
            + mismatch_hint(state_dict, own)
        )


def mismatch_hint(found: Collection[str], expected: Collection[str]) -> str:
    """Says what a checkpoint that does not fit a model seems to be.

    Args:
        found (Collection[str]): The checkpoint's keys.
        expected (Collection[str]): The model's keys.

    Returns:
        str: One or two sentences: a deployed (re-parameterised) X-volution,
        keys with or without a ``'backbone.'``-like prefix, only a part of
        the model (a backbone alone), another kind of model, or another
        configuration of the same one.
    """
    found, expected = set(found), set(expected)
    if _deployed(found) and not _deployed(expected):
        return (
            'It holds a re-parameterised (deployed) X-volution, as '
            'tools/deploy/reparameterize.py writes: build the model in '
            'deploy form with the --cfg-options that tool printed (e.g. '
            'model.backbone.deploy=True).'
        )
    if _deployed(expected) and not _deployed(found):
        return (
            'The model is built in deploy form (deploy=True) but the file '
            'holds the training form: drop deploy=True, or re-parameterise '
            'the file with tools/deploy/reparameterize.py.'
        )
    for prefix in _prefixes(found):
        inner = {k[len(prefix) :] for k in found if k.startswith(prefix)}
        if _fits(inner, expected):
            return (
                f'Its keys carry the prefix {prefix!r} (a converted backbone, '
                'or a whole detector or segmentor): load it with '
                f"prefix={prefix!r}, e.g. init_cfg=dict(type='Pretrained', "
                f'checkpoint=..., prefix={prefix!r}).'
            )
    for prefix in _prefixes(expected):
        part = {k for k in expected if k.startswith(prefix)}
        if _fits({prefix + k for k in found}, part):
            return (
                f'It holds the {prefix[:-1]} alone, its keys without the '
                f'prefix {prefix!r}: the rest of the model has no weights '
                'in it.' + _TRAIN_FROM_IT.format(prefix=prefix)
            )
    present = _prefixes(found) & _prefixes(expected)
    part = {k for k in expected if k.startswith(tuple(present))}
    if present and part != expected and _fits(found, part):
        names = ', '.join(sorted(p[:-1] for p in present))
        absent = ', '.join(sorted(p[:-1] for p in _prefixes(expected - part)))
        return (
            f'It holds only the {names} of the model, nothing for the '
            f'{absent}.'
            + (
                _TRAIN_FROM_IT.format(prefix='backbone.')
                if present == {'backbone.'}
                else ''
            )
        )
    held, built = describe_model(found), describe_model(expected)
    if held != built:
        hint = f'It seems to hold {held}; the model is {built}.'
        if 'classifier' in held:
            hint += ' Convert it first (tools/model_converters/).'
        return hint
    return (
        f'Both seem to be {built}, in another configuration (depth, '
        "widths, stages or the heads' classes differ): check that the file "
        'was trained with this config.'
    )


_TRAIN_FROM_IT = (
    ' To train from it, use it as pretrained weights, e.g. '
    "init_cfg=dict(type='Pretrained', checkpoint=..., prefix={prefix!r}); "
    'evaluate a checkpoint written by training.'
)


def describe_model(keys: Collection[str]) -> str:
    """Names the kind of model a set of state-dict keys belongs to.

    Args:
        keys (Collection[str]): State-dict keys.

    Returns:
        str: E.g. ``'an ACmix Swin detector'``, ``'a plain ResNet
        segmentor'``, ``'an X-volution ResNet backbone'``.
    """
    op = ''
    if any(k.endswith(('.rate1', '.rate2')) for k in keys):
        op = 'ACmix'
    elif _deployed(keys):
        op = 'deployed X-volution'
    elif any('.pssa.' in k for k in keys):
        op = 'X-volution'
    layout = ''
    if any('.blocks.' in k for k in keys) and any(
        'patch_embed' in k for k in keys
    ):
        layout = 'Swin'
    elif any(k.startswith(('layer1.', 'backbone.layer1.')) for k in keys):
        layout = 'ResNet'
    roots = {k.split('.', 1)[0] for k in keys}
    if roots & {'roi_head', 'rpn_head', 'bbox_head'}:
        task = 'detector'
    elif 'decode_head' in roots:
        task = 'segmentor'
    elif roots & {'head', 'fc'}:
        task = 'classifier'
    else:
        task = 'backbone'
    if layout and not op:
        op = 'plain'
    words = ' '.join(word for word in (op, layout, task) if word)
    return ('an ' if words[0] in 'AEIOUXaeiou' else 'a ') + words


def _deployed(keys: Collection[str]) -> bool:
    return any(k.endswith('.dynamic_weight') for k in keys)


def _prefixes(keys: Collection[str]) -> set[str]:
    """The first dotted components of ``keys``, each with its dot."""
    return {k.split('.', 1)[0] + '.' for k in keys if '.' in k}


def _fits(keys: set[str], wanted: set[str]) -> bool:
    """Whether two key sets mostly agree (a few buffers may differ)."""
    return bool(wanted) and len(keys & wanted) >= 0.9 * max(
        len(keys), len(wanted)
    )


class _Unimportable(dict):
    """Stands in for a pickled object whose class is not importable."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.update(state)


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Unimportable


class _TolerantPickle:
    """A ``pickle`` module for ``torch.load`` that tolerates missing
    classes."""

    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)
    __name__ = 'pickle'


def write_backbone_checkpoint(
    state_dict: Mapping[str, Tensor],
    path: str,
    force: bool = False,
    prefix: str = 'backbone.',
) -> None:
    """Writes ``{'state_dict': {prefix + key: value}}`` atomically.

    Args:
        state_dict (Mapping[str, Tensor]): Backbone weights, without prefix.
        path (str): Destination file.
        force (bool): Overwrite an existing ``path``. Defaults to False.
        prefix (str): Put before every key; ``''`` writes the keys of a
            whole model as they are. Defaults to ``'backbone.'``.
    """
    payload = {
        'state_dict': {
            f'{prefix}{key}': value.detach().clone()
            for key, value in state_dict.items()
        }
    }
    save_atomically(payload, path, force=force)


def save_atomically(payload: object, path: str, force: bool = False) -> None:
    """``torch.save`` under a temporary name beside ``path``, then rename.

    An interrupted run never leaves a partial file at ``path``. The same
    payload gives the same bytes: ``torch.save`` names the records inside
    its zip archive after the file it writes to, so it is given an open
    file (records under ``archive/``), never the random temporary name.

    Raises:
        FileExistsError: If ``path`` exists and ``force`` is False.
        IsADirectoryError: If ``path`` is a folder.
        NotADirectoryError: If a parent of ``path`` is a file.
    """
    check_destination(path, force, 'checkpoint')
    with atomic_path(path) as partial, open(partial, 'wb') as file:
        torch.save(payload, file)
