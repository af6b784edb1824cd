"""Writing files all or nothing: checkpoints, ONNX graphs, bookkeeping."""

import contextlib
import os
import os.path as osp
import tempfile
from collections.abc import Iterator

PARTIAL_SUFFIX = '.partial'


def check_destination(
    path: str, force: bool = False, what: str = 'output file'
) -> None:
    """Checks, before any work, that a file can be written at ``path``.

    Args:
        path (str): The file to write later (its folder may be missing).
        force (bool): Whether an existing file may be replaced. Defaults
            to False.
        what (str): What the file is, for the messages. Defaults to
            ``'output file'``.

    Raises:
        IsADirectoryError: If ``path`` is a folder.
        FileExistsError: If ``path`` exists and ``force`` is False.
        NotADirectoryError: If a parent of ``path`` is a file.
        PermissionError: If the nearest existing folder is not writable.
    """
    if osp.isdir(path):
        raise IsADirectoryError(
            f'{what} {path!r} is a folder; expected a file name, e.g. '
            f'{osp.join(path, "")}NAME'
        )
    if osp.lexists(path) and not force:
        raise FileExistsError(
            f'{what} {path!r} already exists; pass --force to overwrite it'
        )
    _check_writable_under(osp.dirname(osp.abspath(path)), f'{what} {path!r}')


def check_folder(path: str, what: str = 'output folder') -> None:
    """Checks, before any work, that ``path`` is or can become a folder.

    Args:
        path (str): A folder that may not exist yet.
        what (str): What the folder is, for the messages. Defaults to
            ``'output folder'``.

    Raises:
        NotADirectoryError: If ``path`` or one of its parents is a file.
        PermissionError: If the nearest existing folder is not writable.
    """
    if osp.lexists(path) and not osp.isdir(path):
        raise NotADirectoryError(
            f'{what} {path!r} is a file; expected a folder'
        )
    _check_writable_under(osp.abspath(path), f'{what} {path!r}')


def _check_writable_under(folder: str, subject: str) -> None:
    """Finds the nearest existing folder at or above ``folder`` and checks
    that files can be created there."""
    existing = folder
    while not osp.isdir(existing):
        if osp.lexists(existing):
            raise NotADirectoryError(
                f'{subject} lies under {existing!r}, which is a file; '
                'expected a folder'
            )
        existing = osp.dirname(existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f'{subject} cannot be written: {existing!r} is not writable'
        )


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write in place of ``path``.

    The temporary file is hidden beside ``path`` (same file system, so the
    rename is atomic). When the block ends normally it is flushed to disk,
    given the usual permissions and renamed to ``path``, and the folder is
    flushed so that the rename survives a crash; when the block raises it
    is deleted. Whatever moment the process dies, ``path`` is either the
    old file or the complete new one.

    Args:
        path (str): The file to write; its folder is created if needed.

    Yields:
        str: The temporary path (the file exists, empty).
    """
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, partial = tempfile.mkstemp(
        dir=folder, prefix=f'.{osp.basename(path)}.', suffix=PARTIAL_SUFFIX
    )
    os.close(handle)
    try:
        yield partial
        fsync(partial)
        # mkstemp makes the file private; give it what open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    except BaseException:
        if osp.exists(partial):
            os.unlink(partial)
        raise
    fsync_folder(folder)


def fsync(path: str) -> None:
    """Flushes the file at ``path`` to disk."""
    with open(path, 'rb') as file:
        os.fsync(file.fileno())


def fsync_folder(folder: str) -> None:
    """Flushes a folder's entries: a rename is durable only then."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
