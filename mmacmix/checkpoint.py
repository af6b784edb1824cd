"""Reading, checking and writing checkpoints: the one place weights load.

Every file mmacmix loads (``--resume``, ``load_from``, ``Pretrained``
initialisation, the converters, export, re-parameterisation, inference) is
read by :func:`read_checkpoint`, with ``weights_only=True``: a checkpoint is
a pickle, and a pickle can run any code while it is loaded. What Runner
checkpoints and the official releases hold beyond tensors is allowed by
name (:func:`checkpoint_safe_globals`); a file that needs anything else is
refused with an error naming it (:class:`UntrustedCheckpointError`), unless
it is trusted (``--trust-checkpoint`` on the command lines,
:func:`trusted_checkpoints` or ``trust=True`` in Python). Code that calls a
loader it does not own (mmdet's inferencers) wraps it in
:func:`runner_checkpoint_globals`. Nothing here changes MMEngine's or
torch's loaders outside such a call.

The rest is the file handling the tools share: clear errors for unreadable
input and for checkpoints that do not fit a model (saying what the file
seems to hold), and atomic, non-clobbering, reproducible output. The
converters themselves are pure functions (``convert_acmix_resnet``...).
"""

import contextlib
import functools
import os
import os.path as osp
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict
from collections.abc import (
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import urlparse

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


def read_checkpoint(
    path: str, trust: bool | None = None, map_location='cpu'
) -> Mapping:
    """Reads a checkpoint: the one reader of every file mmacmix loads.

    By default the file is unpickled with ``weights_only=True`` and the
    objects of :func:`checkpoint_safe_globals` allowed by name: tensors,
    numbers, strings and containers, NumPy arrays, MMEngine's message hub
    and the yacs config of the official Swin releases (read as an
    ``OrderedDict``). Anything else could run code while it is unpickled,
    so a file that needs it is refused. With ``trust`` it is read as torch
    did before 2.6 (``weights_only=False``; classes that cannot be imported
    are read as plain dicts): only for files you trust.

    URLs (``http(s)://``, ``torchvision://``, ``open-mmlab://``) are
    downloaded into torch's hub cache (``$TORCH_HOME/hub/checkpoints``) and
    read the same way; other schemes (``s3://``...) are read by MMEngine's
    loaders under the same allowed objects.

    Args:
        path (str): A local file or a URL.
        trust (bool, optional): Unpickle anything. Defaults to None: what
            the innermost :func:`trusted_checkpoints` block says, else
            False.
        map_location: As for ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        Mapping: The checkpoint.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        IsADirectoryError: If ``path`` is a folder.
        OSError: If a URL cannot be downloaded.
        UntrustedCheckpointError: If the file needs another object (a
            ``ValueError`` naming it).
        ValueError: If the file is truncated, not a checkpoint, or holds
            something other than a dict.
    """
    if trust is None:
        trust = _TRUST.get()
    if '://' in path:
        data = _read_remote(path, trust, map_location)
    else:
        if osp.isdir(path):
            raise IsADirectoryError(
                f'checkpoint {path!r} is a folder; expected a file written '
                'by torch.save'
            )
        if not osp.isfile(path):
            raise FileNotFoundError(f'checkpoint {path!r} does not exist')
        data = _unpickle(path, path, trust, map_location)
    if not isinstance(data, Mapping):
        raise ValueError(
            f'{path!r} holds a {type(data).__name__}, not a checkpoint dict; '
            "expected a state dict or a dict with one under 'state_dict'"
        )
    return data


class UntrustedCheckpointError(ValueError):
    """A checkpoint needs objects that only trusted files may create."""


TRUST_HINT = (
    'if you trust the file, pass --trust-checkpoint (trust=True in Python) '
    'to load it anyway'
)

_TRUST: ContextVar[bool] = ContextVar('mmacmix_trust', default=False)


@contextlib.contextmanager
def trusted_checkpoints(trust: bool = True) -> Iterator[None]:
    """Makes :func:`read_checkpoint` trust every file read inside the block.

    The switch behind ``--trust-checkpoint``: the loads a command does deep
    inside MMEngine (``Pretrained`` initialisation, ``load_from``,
    ``resume``) go through :func:`read_checkpoint` without an argument for
    it. Scoped to the block (and its thread or task), never process-wide.

    Args:
        trust (bool): Whether files read inside are trusted. Defaults to
            True; False restores the safe default inside an outer block.
    """
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


@functools.cache
def checkpoint_safe_globals() -> tuple:
    """The objects beyond tensors that checkpoints hold, allowed by name.

    What MMEngine's Runner writes (NumPy arrays, scalars and dtypes in the
    message hub and random states, MMEngine's ``HistoryBuffer`` with its
    statistics methods, pickled as ``getattr(HistoryBuffer, 'mean')``),
    the same under NumPy 1's module names, and the yacs ``CfgNode`` of the
    official Swin releases, read as an ``OrderedDict`` (yacs need not be
    installed). None of them runs code while it is unpickled; ``getattr``
    is replaced by :func:`_history_buffer_method`, which gives those
    methods and nothing else.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer
    from numpy._core import multiarray

    dtypes = [
        value
        for value in vars(np.dtypes).values()
        if isinstance(value, type) and issubclass(value, np.dtype)
    ]
    return (
        multiarray._reconstruct,
        multiarray.scalar,
        (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
        (multiarray.scalar, 'numpy.core.multiarray.scalar'),
        np.ndarray,
        np.dtype,
        *dtypes,
        HistoryBuffer,
        (_history_buffer_method, 'builtins.getattr'),
        (OrderedDict, 'yacs.config.CfgNode'),
    )


_REFUSED_GETATTR = 'refused getattr'


def _history_buffer_method(owner: object, name: str) -> object:
    """``getattr`` as Runner checkpoints use it: the statistics methods of
    MMEngine's ``HistoryBuffer`` (``min``, ``max``, ``current``, ``mean``
    and any registered since), which its ``__getstate__`` saves by name;
    anything else is refused."""
    from mmengine.logging import HistoryBuffer

    methods = {'min', 'max', 'current', 'mean'}
    methods |= set(HistoryBuffer._statistics_methods)
    if owner is HistoryBuffer and name in methods:
        return getattr(owner, name)
    what = getattr(owner, '__qualname__', type(owner).__qualname__)
    raise pickle.UnpicklingError(
        f'{_REFUSED_GETATTR} builtins.getattr({what}, {name!r})|'
    )


@contextlib.contextmanager
def runner_checkpoint_globals() -> Iterator[None]:
    """Lets ``torch.load(..., weights_only=True)`` read Runner checkpoints.

    Inside the block the objects of :func:`checkpoint_safe_globals` are
    allowed (``torch.serialization.safe_globals``); nothing else changes
    and nothing stays changed after it. For code that must call a loader
    it does not own, e.g. mmdet's ``DetInferencer``, which loads its
    weights with MMEngine (``torch.load`` without ``weights_only``, True on
    torch >= 2.6)::

        with runner_checkpoint_globals():
            inferencer = DetInferencer(config, checkpoint)

    Code of this project reads files with :func:`read_checkpoint`, which
    uses this and names what a refused file wanted.
    """
    with torch.serialization.safe_globals(list(checkpoint_safe_globals())):
        yield


def _unpickle(source: str, path: str, trust: bool, map_location) -> object:
    """``torch.load`` of a local ``path``, safe unless ``trust``."""
    try:
        if trust:
            return torch.load(
                path,
                map_location=map_location,
                weights_only=False,
                pickle_module=_TolerantPickle,
            )
        with runner_checkpoint_globals():
            return torch.load(path, map_location=map_location)
    except Exception as error:  # torch raises many types for bad files
        if not trust and isinstance(error, pickle.UnpicklingError):
            refused = str(error).partition(_REFUSED_GETATTR + ' ')[2]
            wanted = [refused.split('|')[0]] if refused else []
            wanted = wanted or unsafe_globals(path)
            if wanted:
                more = f' and {len(wanted) - 1} more' if wanted[1:] else ''
                raise UntrustedCheckpointError(
                    f'{source!r} was not loaded: unpickling it needs '
                    f'{wanted[0]}{more}, which a checkpoint of weights never '
                    'holds and which can run code; ' + TRUST_HINT
                ) from None
        # torch appends paragraphs of advice; its reason is one sentence.
        found = ' '.join(str(error).split())
        found = found.partition('WeightsUnpickler error: ')[2] or found
        raise ValueError(
            f'{source!r} is not a readable PyTorch checkpoint (truncated or '
            f'another format: {type(error).__name__}: '
            f'{found.split(". ")[0]}); expected a file written by torch.save'
        ) from error


def unsafe_globals(path: str) -> list[str]:
    """Names the objects a pickle file needs beyond the allowed ones.

    Reads the pickle opcodes only (``pickletools``); nothing is created.

    Args:
        path (str): A file written by ``torch.save`` (either format) or
            ``pickle.dump``.

    Returns:
        list[str]: Dotted names such as ``'posix.system'``, in the order
        met, without those ``weights_only=True`` allows (torch's own and
        :func:`checkpoint_safe_globals`).
    """
    with runner_checkpoint_globals():
        if zipfile.is_zipfile(path):
            try:
                return list(
                    torch.serialization.get_unsafe_globals_in_checkpoint(path)
                )
            except Exception:  # a damaged archive: no names to give
                return []
        from torch import _weights_only_unpickler as unpickler

        allowed = {
            **unpickler._get_allowed_globals(),
            **unpickler._get_user_allowed_globals(),
        }
    return [name for name in _pickle_globals(path) if name not in allowed]


_STRING_OPS = {
    'STRING',
    'BINSTRING',
    'SHORT_BINSTRING',
    'UNICODE',
    'BINUNICODE',
    'SHORT_BINUNICODE',
    'BINUNICODE8',
}
_STACK_NEUTRAL_OPS = {'PROTO', 'FRAME', 'MEMOIZE', 'PUT', 'BINPUT'}


def _pickle_globals(path: str, limit: int = 16) -> list[str]:
    """The globals named in the pickles at the start of ``path``.

    The legacy ``torch.save`` format is several pickles, then raw storage
    bytes: reading stops at the first stream that is no pickle.
    ``STACK_GLOBAL`` takes its module and name from the two strings pushed
    before it, directly or from the memo.
    """
    names: list[str] = []
    with open(path, 'rb') as file:
        for _ in range(limit):
            pushed: list[str | None] = []
            memo: dict[int, str | None] = {}
            try:
                for opcode, arg, _ in pickletools.genops(file):
                    name = opcode.name
                    top = pushed[-1] if pushed else None
                    if name == 'GLOBAL':
                        names.append(arg.replace(' ', '.'))
                    elif name == 'STACK_GLOBAL' and len(pushed) > 1:
                        names.append(f'{pushed[-2]}.{pushed[-1]}')
                    if name in _STRING_OPS:
                        pushed.append(arg)
                    elif name == 'MEMOIZE':
                        memo[len(memo)] = top
                    elif name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                        memo[arg] = top
                    elif name in ('GET', 'BINGET', 'LONG_BINGET'):
                        pushed.append(memo.get(arg))
                    elif name not in _STACK_NEUTRAL_OPS:
                        pushed.append(None)
            except Exception:  # past the pickles: storage bytes or the end
                break
    return [name for name in names if 'None' not in name.split('.')]


def _read_remote(url: str, trust: bool, map_location) -> object:
    """Downloads ``url`` into torch's hub cache, then reads it."""
    from mmengine.runner import CheckpointLoader

    resolved = resolve_url(url)
    if resolved is None:  # s3://, pavi://...: MMEngine's back ends
        with runner_checkpoint_globals():
            return CheckpointLoader.load_checkpoint(url, map_location)
    if '://' not in resolved:  # an open-mmlab:// entry naming a local file
        return _unpickle(url, resolved, trust, map_location)
    return _unpickle(url, download(url, resolved), trust, map_location)


def resolve_url(url: str) -> str | None:
    """The address MMEngine's loaders would fetch ``url`` from.

    Args:
        url (str): ``http(s)://...``, ``torchvision://NAME``,
            ``modelzoo://NAME`` or ``open-mmlab://NAME``.

    Returns:
        str | None: An ``http(s)`` URL, a local file (some ``open-mmlab``
        entries), or None for schemes read by MMEngine's back ends.

    Raises:
        ValueError: If MMEngine knows no model of that name.
    """
    from mmengine.runner import checkpoint as mm

    scheme, _, name = url.partition('://')
    if scheme in ('http', 'https'):
        return url
    if scheme in ('torchvision', 'modelzoo'):
        urls = mm.get_torchvision_models()
    elif scheme in ('open-mmlab', 'openmmlab'):
        urls = mm.get_external_models()
        name = mm.get_deprecated_model_names().get(name, name)
    else:
        return None
    if name not in urls:
        raise ValueError(
            f'{url!r} names no model MMEngine knows; expected one of '
            f'{describe_keys(sorted(urls))}'
        )
    if urls[name].startswith(('http://', 'https://')):
        return urls[name]
    return osp.join(mm._get_mmengine_home(), urls[name])


def download(source: str, url: str) -> str:
    """Downloads ``url`` into torch's hub cache, unless it is there.

    The file lands where ``torch.hub.load_state_dict_from_url`` (MMEngine's
    loader) keeps it: one download serves both. In a distributed run rank
    0 downloads first, then the others read its copy.

    Args:
        source (str): What the user wrote (``torchvision://resnet50``), for
            the message.
        url (str): The address to fetch.

    Returns:
        str: The local file.

    Raises:
        OSError: If it cannot be downloaded: one line naming ``source``,
            ``url`` and where to put the file by hand.
    """
    from mmengine.dist import barrier, get_dist_info

    folder = osp.join(torch.hub.get_dir(), 'checkpoints')
    path = osp.join(folder, osp.basename(urlparse(url).path))
    rank, world_size = get_dist_info()
    error = None
    if rank == 0 and not osp.isfile(path):
        try:
            os.makedirs(folder, exist_ok=True)
            # Written under a temporary name and renamed by torch.
            torch.hub.download_url_to_file(url, path, progress=False)
        except OSError as failure:  # URLError and HTTPError included
            error = failure
    if world_size > 1:
        barrier()
    if error is not None or not osp.isfile(path):
        reason = getattr(error, 'reason', error) or 'no file after download'
        raise DownloadError(source, url, str(reason), path)
    return path


class DownloadError(OSError):
    """A checkpoint named by a URL could not be downloaded.

    Attributes:
        source (str): The name the user wrote (``torchvision://resnet50``).
        url (str): The address it was fetched from.
        reason (str): Why it failed.
        path (str): Where the file goes to be found without a network.
    """

    def __init__(self, source: str, url: str, reason: str, path: str):
        super().__init__(
            f'could not download {source} ({url}): {reason}; without a '
            f'network, copy that file to {path}'
        )
        self.source, self.url, self.reason, self.path = (
            source,
            url,
            reason,
            path,
        )

    def __str__(self) -> str:
        return str(self.args[0])


def pretrained_sources(cfg: object) -> list[str]:
    """The checkpoints a model config initialises from.

    Args:
        cfg (object): A model config (nested dicts and lists).

    Returns:
        list[str]: The ``checkpoint`` of every ``init_cfg`` entry of type
        ``Pretrained`` and every ``pretrained=`` string, in config order.
    """
    found: list[str] = []
    if isinstance(cfg, Mapping):
        for key, value in cfg.items():
            if key == 'pretrained' and isinstance(value, str):
                found.append(value)
            elif key == 'init_cfg':
                for init in value if isinstance(value, list) else [value]:
                    if (
                        isinstance(init, Mapping)
                        and init.get('type') == 'Pretrained'
                        and isinstance(init.get('checkpoint'), str)
                    ):
                        found.append(init['checkpoint'])
            else:
                found += pretrained_sources(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            found += pretrained_sources(value)
    return found


def fetch_pretrained(cfg: object) -> None:
    """Downloads and checks the remote pretrained weights of a model config.

    MMEngine loads ``init_cfg`` weights of OpenMMLab's own backbones
    (``torchvision://resnet50`` in the drop-in configs) itself, and reads a
    URL with ``weights_only=False``. Reading each URL here first
    (:func:`read_checkpoint`: downloaded into the cache MMEngine reads,
    refused if it needs more than weights) makes that load a cached file
    that is known to be plain weights, and a failed download one clear
    error before any work.

    Args:
        cfg (object): A model config.

    Raises:
        DownloadError: If a URL cannot be downloaded.
        UntrustedCheckpointError: If a file needs more than weights.
    """
    for source in pretrained_sources(cfg):
        if '://' in source:
            read_checkpoint(source)


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


@dataclass(frozen=True)
class LoadAdvice:
    """How the code loading a file spells the fixes that hints suggest.

    :func:`mismatch_hint` names what a file that does not fit seems to be
    and what to do; the doing depends on where it was loaded: a
    ``Pretrained`` entry of a backbone's ``init_cfg`` (the default) or a
    command line loading a whole model (:func:`mmacmix.apis.
    check_checkpoint` spells the ``--cfg-options`` of its config).

    Attributes:
        source (str): The file, as the fixes name it. Defaults to
            ``'...'``.
        pretrained (callable): ``pretrained(checkpoint, prefix)`` says how
            to load ``checkpoint`` as pretrained backbone weights, its keys
            that start with ``prefix`` (None: all keys, as they are).
        deploy (str): How to build the model in deploy form.
        whole_model (bool): Whether the file goes into a whole model (a
            key prefix cannot be given there).
    """

    source: str = '...'
    pretrained: Callable[[str, str | None], str] = lambda checkpoint, prefix: (
        "init_cfg=dict(type='Pretrained', "
        f'checkpoint={checkpoint}'
        + (f', prefix={prefix!r})' if prefix else ')')
    )
    deploy: str = 'build the model with deploy=True'
    whole_model: bool = False


def load_state_dict_strictly(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    advice: LoadAdvice | None = None,
) -> None:
    """``load_state_dict`` that explains any key or shape mismatch.

    Loading non-strictly and checking the result (rather than comparing key
    sets first) lets load-state-dict pre-hooks of the model adapt keys.

    Args:
        module (nn.Module): The model to load into.
        state_dict (Mapping[str, Tensor]): The weights.
        source (str): Where they came from (a path), for the message.
        advice (LoadAdvice, optional): How the hint spells its fixes.
            Defaults to those of a ``Pretrained`` ``init_cfg``.

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
    hint = mismatch_hint(state_dict, own, advice) if misshapen else ''
    if misshapen:
        key = misshapen[0]
        raise KeyMismatchError(
            f'{source} does not fit {type(module).__name__}: '
            f'{len(misshapen)} tensors have another shape, e.g. {key!r} is '
            f'{tuple(state_dict[key].shape)} in the file, '
            f'{tuple(own[key].shape)} in the model '
            f'({describe_keys(misshapen, 5)}). ' + hint
        )
    result = module.load_state_dict(state_dict, strict=False)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        raise KeyMismatchError(
            f'{source} does not fit {type(module).__name__}: '
            f'{len(missing)} missing keys {describe_keys(sorted(missing), 5)}'
            f', {len(unexpected)} unexpected keys '
            f'{describe_keys(sorted(unexpected), 5)}. '
            + mismatch_hint(state_dict, own, advice)
        )


def load_weights(
    model: nn.Module,
    checkpoint: Mapping,
    source: str,
    strict: bool = True,
    revise_keys: Sequence[tuple[str, str]] = ((r'^module\.', ''),),
) -> None:
    """Loads the weights of a checkpoint read by :func:`read_checkpoint`.

    Strictly by default (:func:`load_state_dict_strictly`: any missing,
    unexpected or misshapen key is a :class:`KeyMismatchError` that says
    what the file seems to hold); with ``strict=False`` as MMEngine does,
    logging the keys that do not fit as a warning. The Runner of
    :mod:`mmacmix.apis` loads ``load_from`` and ``resume`` with it; for
    inference::

        checkpoint = read_checkpoint(path)
        load_weights(model, checkpoint, path)
        model.dataset_meta = checkpoint.get('meta', {}).get('dataset_meta')

    Args:
        model (nn.Module): The model to load into (not a wrapper).
        checkpoint (Mapping): The checkpoint (see :func:`state_dict_of`).
        source (str): Where it came from (a path), for the messages.
        strict (bool): Whether the keys must fit exactly. Defaults to True.
        revise_keys (Sequence[tuple[str, str]]): ``(pattern, replacement)``
            pairs applied to the keys, as MMEngine's. Defaults to removing a
            ``module.`` prefix.

    Raises:
        ValueError: If the checkpoint holds no state dict.
        KeyMismatchError: If ``strict`` and the weights do not fit.
    """
    from mmengine.logging import MMLogger
    from mmengine.runner.checkpoint import load_state_dict

    state_dict = state_dict_of(checkpoint, source)
    for pattern, replacement in revise_keys:
        state_dict = {
            re.sub(pattern, replacement, key): value
            for key, value in state_dict.items()
        }
    if strict:
        load_state_dict_strictly(model, state_dict, source)
    else:
        logger = MMLogger.get_current_instance()
        load_state_dict(model, state_dict, strict=False, logger=logger)


def mismatch_hint(
    found: Collection[str],
    expected: Collection[str],
    advice: LoadAdvice | None = None,
) -> str:
    """Says what a checkpoint that does not fit a model seems to be.

    Args:
        found (Collection[str]): The checkpoint's keys.
        expected (Collection[str]): The model's keys.
        advice (LoadAdvice, optional): How to spell the fixes. Defaults to
            those of a ``Pretrained`` ``init_cfg``.

    Returns:
        str: One or two sentences: a deployed (re-parameterised) X-volution,
        keys with or without a ``'backbone.'``-like prefix, only a part of
        the model (a backbone alone), another kind of model (and which
        converter, if any, makes weights for this one from it), or another
        configuration of the same one.
    """
    advice = advice or LoadAdvice()
    found, expected = set(found), set(expected)
    if _deployed(found) and not _deployed(expected):
        return (
            'It holds a re-parameterised (deployed) X-volution, as '
            'tools/deploy/reparameterize.py writes: ' + advice.deploy + '.'
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
            where = (
                ''
                if advice.whole_model
                else ': load it with '
                f'prefix={prefix!r}, e.g. '
                + advice.pretrained(advice.source, prefix)
            )
            return (
                f'Its keys carry the prefix {prefix!r} (a converted backbone, '
                f'or a whole detector or segmentor){where}.'
            )
    for prefix in _prefixes(expected):
        part = {k for k in expected if k.startswith(prefix)}
        if _fits({prefix + k for k in found}, part):
            return (
                f'It holds the {prefix[:-1]} alone, its keys without the '
                f'prefix {prefix!r}: the rest of the model has no weights '
                'in it.' + _train_from_it(advice, prefix, None)
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
                _train_from_it(advice, 'backbone.', 'backbone.')
                if present == {'backbone.'}
                else ''
            )
        )
    held, built = describe_model(found), describe_model(expected)
    if held != built:
        return (
            f'It seems to hold {held}; the model is {built}.'
            + _converter_hint(held, built, advice)
        )
    return (
        f'Both seem to be {built}, in another configuration (depth, '
        "widths, stages or the heads' classes differ): check that the file "
        'was trained with this config.'
    )


def _train_from_it(advice: LoadAdvice, part: str, prefix: str | None) -> str:
    """How to start training from a file that holds one part of a model."""
    if part != 'backbone.':
        return ''
    return (
        ' To train from it, start from it as pretrained backbone weights: '
        f'{advice.pretrained(advice.source, prefix)}; to evaluate, use a '
        'checkpoint '
        'written by training.'
    )


# The converters: which official weights each one reads, for which model.
_CONVERTERS = {
    'ACmix ResNet': (
        'acmix_resnet2mmacmix.py',
        'the official ACmix-ResNet ImageNet weights',
    ),
    'ACmix Swin': (
        'acmix_swin2mmacmix.py',
        'the official ACmix-Swin ImageNet weights',
    ),
    'X-volution ResNet': (
        'resnet2xvolution.py',
        'a plain torchvision or OpenMMLab ResNet',
    ),
}


def _converter_hint(held: str, built: str, advice: LoadAdvice) -> str:
    """Which converter (if any) makes weights for ``built`` from ``held``."""
    for kind, (script, reads) in _CONVERTERS.items():
        if f' {kind} ' not in f'{built} ':
            continue
        held_kind = 'plain ResNet' if kind == 'X-volution ResNet' else kind
        if f' {held_kind} classifier' in held:
            return (
                f' Convert it with tools/model_converters/{script} FILE OUT '
                'and start from OUT: ' + advice.pretrained('OUT', 'backbone.')
            )
        return (
            f' No converter makes {kind} weights from it '
            f'(tools/model_converters/{script} reads {reads}): train from '
            'scratch without it, or start from converted weights of that '
            'kind.'
        )
    return ''


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
