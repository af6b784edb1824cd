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

Mistakes in a config are expected failures as well: an unknown type or
constructor argument gets the closest registered names
(:func:`mmacmix.registry.explain_build_error`), a syntax error names the
file and line (:func:`mmacmix.configs.explain_syntax_error`).

Under the shell launchers (tools/dist_*.sh), a worker's error line is also
written where the launcher prints it last, after torchrun's report.

:func:`start_command`, called where each command starts, keeps known
third-party deprecation warnings off the console and puts them into the
run's log file.
"""

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping

from torch import Tensor

from mmacmix.checkpoint import (
    read_checkpoint,
    write_backbone_checkpoint,
)
from mmacmix.fileio import check_destination

DEBUG_VARIABLE = 'MMACMIX_DEBUG'
# Set by tools/launch_checks.sh: the folder where each failing worker
# writes its error line, which the launcher prints last.
WORKER_ERRORS_VARIABLE = 'MMACMIX_WORKER_ERRORS'
# Warnings of other packages that the user cannot act on: held back from
# the console, kept in the run's log file.
THIRD_PARTY_WARNINGS = (
    re.compile(r'pkg_resources is deprecated'),
    re.compile(r'Deprecated call to `pkg_resources\.declare_namespace'),
)
_held_warnings: list[str] = []


def start_command() -> None:
    """Keeps third-party deprecation warnings off this command's console.

    Called where each command starts (not at import, so that a program
    importing mmacmix sees every warning). Warnings matching
    :data:`THIRD_PARTY_WARNINGS` are held and written into the run's log
    file by :func:`log_held_warnings` (:func:`exit_on_error` does it when
    the command ends); all others are shown as usual.
    """
    show = warnings.showwarning
    if getattr(show, 'holds_third_party', False):
        return

    def hold(message, category, filename, lineno, file=None, line=None):
        if any(p.search(str(message)) for p in THIRD_PARTY_WARNINGS):
            _hold(message, category, filename, lineno)
        else:
            show(message, category, filename, lineno, file, line)

    hold.holds_third_party = True
    warnings.showwarning = hold


@contextlib.contextmanager
def holding_warnings() -> Iterator[None]:
    """Holds every warning raised inside the block for the log file.

    For a block whose console is for progress only (the demo's builds of
    the model and the Runner, before the run's log exists): the warnings
    go where :func:`log_held_warnings` writes them.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _hold
        yield


def _hold(message, category, filename, lineno, file=None, line=None):
    _held_warnings.append(
        f'{category.__name__}: {message} ({filename}:{lineno})'
    )


def log_held_warnings(logger: logging.Logger | None = None) -> None:
    """Writes the held warnings into the log files of ``logger``.

    Args:
        logger (logging.Logger, optional): The run's logger (MMEngine's
            ``MMLogger``); defaults to the current one. Only its file
            handlers get them; without any, they stay held.
    """
    if not _held_warnings:
        return
    if logger is None:
        from mmengine.logging import MMLogger

        logger = MMLogger.get_current_instance()
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    for text in _held_warnings:
        record = logger.makeRecord(
            logger.name, logging.WARNING, __file__, 0, text, None, None
        )
        for handler in files:
            handler.handle(record)
    _held_warnings.clear()


def report_to_launcher(line: str) -> None:
    """Writes this worker's error line for the shell launcher, if any."""
    folder = os.environ.get(WORKER_ERRORS_VARIABLE)
    if not folder or not os.path.isdir(folder):
        return
    rank = os.environ.get('RANK', '0')
    try:
        with open(os.path.join(folder, f'rank{rank}'), 'w') as file:
            file.write(line.rstrip('\n') + '\n')
    except OSError:
        pass  # the launcher then prints only torchrun's report


class ArgumentParser(argparse.ArgumentParser):
    """``argparse``'s parser; a usage error also reaches the launcher."""

    def error(self, message: str):
        report_to_launcher(f'{self.prog}: error: {message}')
        super().error(message)


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

    What is expected: see :func:`expected_error_message`; anything else
    keeps its traceback. Either way, under a shell launcher the line is
    also left for it (:func:`report_to_launcher`). The block is the
    command's work: third-party warnings are held from its start
    (:func:`start_command`) and go to the run's log file when it ends.

    Args:
        debug (bool): Let the exception through, with its traceback.
            ``MMACMIX_DEBUG=1`` in the environment does the same. Defaults
            to False.

    Raises:
        SystemExit: With status 1, after printing ``error: MESSAGE``.
    """
    start_command()
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, SyntaxError) as error:
        message = expected_error_message(error)
        if message is None or debug or _debugging():
            report_to_launcher(_last_line(error))
            raise
        message = ' '.join(message.split())
        report_to_launcher(f'error: {message}')
        print(f'error: {message}', file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Exception as error:
        report_to_launcher(_last_line(error))
        raise
    finally:
        log_held_warnings()


def expected_error_message(error: BaseException) -> str | None:
    """The message of an expected failure, or None for a bug.

    Expected: ``OSError`` and ``ValueError``; a ``KeyError`` that carries
    a sentence (a bare key is a failed lookup: a bug); a config's unknown
    type or constructor argument, or syntax error (with a suggestion).
    """
    from mmacmix.configs import explain_syntax_error
    from mmacmix.registry import explain_build_error

    if isinstance(error, SyntaxError):
        return explain_syntax_error(error)
    explained = explain_build_error(error)
    if explained is not None or isinstance(error, TypeError):
        return explained
    if isinstance(error, KeyError):
        message = error.args[0] if len(error.args) == 1 else ''
        if not isinstance(message, str) or ' ' not in message:
            return None  # a dictionary lookup that failed: a bug
        return message
    return str(error)


def _debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, '0') not in ('', '0')


def _last_line(error: BaseException) -> str:
    """The last line of the traceback that ``error`` prints."""
    return f'{type(error).__name__}: {error}'.splitlines()[0]


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
    start_command()
    parser = ArgumentParser(description=description)
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
