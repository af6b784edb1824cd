"""How every command line of the project fails, and the converters' CLI.

Expected failures (a missing, unreadable or misplaced file, a checkpoint
that does not fit the model, a bad argument, a launcher started outside its
environment) raise ``OSError`` or ``ValueError`` in the tools, or a
``KeyError`` that carries a sentence (:class:`~mmacmix.checkpoint.
KeyMismatchError`, the converters' key checks, MMEngine's registry for an
unknown type). :func:`exit_on_error` prints them as one line,
``error: MESSAGE``, on stderr and exits with status 1. Any other exception,
a ``KeyError`` of a bare key included, is a bug and keeps its traceback.
``--debug`` (every tool has it) or ``MMACMIX_DEBUG=1`` shows the traceback
of expected failures too.
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor

from mmacmix.checkpoint import (
    read_checkpoint,
    write_backbone_checkpoint,
)
from mmacmix.fileio import check_destination

DEBUG_VARIABLE = 'MMACMIX_DEBUG'


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--debug``, read by :func:`exit_on_error`."""
    parser.add_argument(
        '--debug',
        action='store_true',
        help='on an error, show the traceback instead of the one-line '
        f'message (also: {DEBUG_VARIABLE}=1)',
    )


@contextlib.contextmanager
def exit_on_error(debug: bool = False) -> Iterator[None]:
    """Turns an expected failure inside the block into a one-line exit.

    Args:
        debug (bool): Let the exception through, with its traceback.
            ``MMACMIX_DEBUG=1`` in the environment does the same. Defaults
            to False.

    Raises:
        SystemExit: With status 1, after printing ``error: MESSAGE``.
    """
    try:
        yield
    except (OSError, ValueError, KeyError) as error:
        message = str(error)
        if isinstance(error, KeyError):
            message = error.args[0] if len(error.args) == 1 else ''
            if not isinstance(message, str) or ' ' not in message:
                raise  # a dictionary lookup that failed: a bug
        if debug or os.environ.get(DEBUG_VARIABLE, '0') not in ('', '0'):
            raise
        message = ' '.join(message.split())
        print(f'error: {message}', file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """Adds ``--trust-checkpoint``: read checkpoints with
    ``weights_only=False`` (see :mod:`mmacmix.checkpoint`)."""
    parser.add_argument(
        '--trust-checkpoint',
        action='store_true',
        help='unpickle checkpoints that hold more than weights (torch.load '
        'weights_only=False); such a file can run code: only for files you '
        'trust',
    )


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    return _int_from(text, 1, 'a positive integer')


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 0."""
    return _int_from(text, 0, 'a non-negative integer')


def _int_from(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}')
    return value


def convert_cli(
    convert: Callable[..., Mapping[str, Tensor]],
    description: str,
    argv: list[str] | None = None,
    extra_arguments: dict[str, dict] | None = None,
    whole_model_option: str | None = None,
) -> None:
    """Runs a converter as ``SRC DST [--force]``: the body of every CLI.

    DST is checked before SRC is read; errors are one line with status 1,
    and nothing is written unless the conversion succeeded.

    Args:
        convert (callable): ``convert(checkpoint, **options)`` returns the
            backbone state dict.
        description (str): The CLI's help text.
        argv (list[str], optional): Arguments; defaults to ``sys.argv``.
        extra_arguments (dict[str, dict], optional): Options of the
            converter, ``{'--depth': dict(type=int, ...)}``; their values go
            to ``convert`` as keyword arguments.
        whole_model_option (str, optional): The name of a flag among them
            under which ``convert`` returns the state dict of a whole model
            (keys with their ``backbone.``... prefixes), written as it is.
            Defaults to None.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('src', help='official checkpoint to read')
    parser.add_argument('dst', help='converted checkpoint to write')
    parser.add_argument(
        '--force', action='store_true', help='overwrite DST if it exists'
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    options = []
    for flag, kwargs in (extra_arguments or {}).items():
        options.append(parser.add_argument(flag, **kwargs).dest)
    args = parser.parse_args(argv)
    with exit_on_error(args.debug):
        check_destination(args.dst, args.force, 'checkpoint')
        state_dict = convert(
            read_checkpoint(args.src, trust=args.trust_checkpoint),
            **{name: getattr(args, name) for name in options},
        )
        whole_model = getattr(args, whole_model_option or '', False)
        write_backbone_checkpoint(
            state_dict,
            args.dst,
            force=args.force,
            prefix='' if whole_model else 'backbone.',
        )
    print(f'wrote {len(state_dict)} tensors to {args.dst}')
