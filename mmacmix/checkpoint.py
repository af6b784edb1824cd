"""Reading source checkpoints and writing converted ones, for the converters.

The converters themselves are pure functions next to their models
(``convert_acmix_resnet``...); this module holds the file handling the
command-line tools share: clear errors for unreadable input, and atomic,
non-clobbering output.
"""

import argparse
import os.path as osp
import pickle
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mmacmix.fileio import atomic_path


def read_checkpoint(path: str) -> Mapping:
    """Reads a checkpoint file written by ``torch.save``.

    Official checkpoints hold more than tensors (a yacs config, optimiser
    state), so they are read with ``weights_only=False``: only convert files
    you trust. Objects whose class cannot be imported here (the yacs
    ``CfgNode`` of the Swin releases, when yacs is not installed) are read
    as plain dicts: converters only need the tensors.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is truncated or not a checkpoint.
    """
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
        raise ValueError(
            f'{path!r} is not a readable PyTorch checkpoint (truncated or '
            f'another format): {type(error).__name__}: {error}'
        ) from error
    if not isinstance(data, Mapping):
        raise ValueError(
            f'{path!r} holds a {type(data).__name__}, not a checkpoint dict'
        )
    return data


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
    state_dict: Mapping[str, Tensor], path: str, force: bool = False
) -> None:
    """Writes ``{'state_dict': {'backbone.' + key: value}}`` atomically.

    Args:
        state_dict (Mapping[str, Tensor]): Backbone weights, without prefix.
        path (str): Destination file.
        force (bool): Overwrite an existing ``path``. Defaults to False.
    """
    payload = {
        'state_dict': {
            f'backbone.{key}': value.detach().clone()
            for key, value in state_dict.items()
        }
    }
    save_atomically(payload, path, force=force)


def save_atomically(payload: object, path: str, force: bool = False) -> None:
    """``torch.save`` under a temporary name beside ``path``, then rename.

    An interrupted run never leaves a partial file at ``path``.

    Raises:
        FileExistsError: If ``path`` exists and ``force`` is False.
    """
    refuse_existing(path, force)
    with atomic_path(path) as partial:
        torch.save(payload, partial)


def refuse_existing(path: str, force: bool) -> None:
    """Raises ``FileExistsError`` if ``path`` exists, unless ``force``."""
    if osp.exists(path) and not force:
        raise FileExistsError(
            f'{path!r} already exists; pass --force to overwrite it'
        )


def convert_cli(
    convert: Callable[..., Mapping[str, Tensor]],
    description: str,
    argv: list[str] | None = None,
    extra_arguments: dict[str, dict] | None = None,
) -> None:
    """Runs a converter as ``SRC DST [--force]``: the body of every CLI.

    Errors are printed as one line and exit with status 1; nothing is
    written unless the conversion succeeded.

    Args:
        convert (callable): ``convert(checkpoint, **options)`` returns the
            backbone state dict.
        description (str): The CLI's help text.
        argv (list[str], optional): Arguments; defaults to ``sys.argv``.
        extra_arguments (dict[str, dict], optional): Options of the
            converter, ``{'--depth': dict(type=int, ...)}``; their values go
            to ``convert`` as keyword arguments.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('src', help='official checkpoint to read')
    parser.add_argument('dst', help='converted checkpoint to write')
    parser.add_argument(
        '--force', action='store_true', help='overwrite DST if it exists'
    )
    options = []
    for flag, kwargs in (extra_arguments or {}).items():
        options.append(parser.add_argument(flag, **kwargs).dest)
    args = parser.parse_args(argv)
    try:
        refuse_existing(args.dst, args.force)
        state_dict = convert(
            read_checkpoint(args.src),
            **{name: getattr(args, name) for name in options},
        )
        write_backbone_checkpoint(state_dict, args.dst, force=args.force)
    except (OSError, KeyError, ValueError) as error:
        message = error.args[0] if isinstance(error, KeyError) else error
        parser.exit(1, f'error: {message}\n')
    print(f'wrote {len(state_dict)} tensors to {args.dst}')
