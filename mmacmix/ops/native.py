"""The compiled CPU kernels, ``mmacmix.ops._ext``, or None where mmacmix
was installed without them (then ``IMPORT_ERROR`` says why)."""

try:
    from . import _ext as ext
except ImportError as error:  # built without the extension
    ext = None
    IMPORT_ERROR: ImportError | None = error
else:
    IMPORT_ERROR = None
