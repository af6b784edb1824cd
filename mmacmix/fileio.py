"""Writing files all or nothing: checkpoints, ONNX graphs, bookkeeping."""

import contextlib
import os
import os.path as osp
import tempfile
from collections.abc import Iterator

PARTIAL_SUFFIX = '.partial'


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
