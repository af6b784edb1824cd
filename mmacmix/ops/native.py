"""The compiled CPU kernels, ``mmacmix.ops._ext``, or None where mmacmix
was installed without them (then ``IMPORT_ERROR`` says why).

The local-attention kernel is compiled for several instruction sets
(``avx512``, ``avx2`` and the compiler's ``baseline``) and runs the widest
that the CPU supports.  The environment variable ``MMACMIX_CPU_ISA``
(``auto``, ``avx512``, ``avx2`` or ``baseline``), read when this module is
first imported, forces one: for example to measure or test the AVX2 code on
an AVX-512 machine.  :func:`set_cpu_isa` changes it later in a process.
"""

import os
import warnings

CPU_ISA_ENV = 'MMACMIX_CPU_ISA'

try:
    from . import _ext as ext
except ImportError as error:  # built without the extension
    ext = None
    IMPORT_ERROR: ImportError | None = error
else:
    IMPORT_ERROR = None


_warned_ops: set[str] = set()


def warn_fallback_once(op: str) -> None:
    """Warns, once per op and process, that ``op`` runs in PyTorch because
    the compiled kernels are missing.

    Call it only from code that runs eagerly (an op's body), never from
    code that ``torch.compile`` traces, which must not hold a warning.

    Args:
        op (str): The op's name, as the message says it.
    """
    if op in _warned_ops:
        return
    _warned_ops.add(op)
    warnings.warn(
        'mmacmix was installed without its compiled extension '
        f'({IMPORT_ERROR}); {op} falls back to a slower PyTorch path. '
        'Reinstall mmacmix with torch importable and a C++ compiler present '
        '(pip install --no-build-isolation ...) to build it.',
        stacklevel=3,
    )


def cpu_isa() -> str | None:
    """The instruction set the compiled local attention runs
    (``avx512``, ``avx2`` or ``baseline``), None without the extension."""
    return None if ext is None else ext.cpu_isa()


def supported_cpu_isas() -> list[str]:
    """The instruction sets this build and CPU can run, narrowest first
    (empty without the extension)."""
    return [] if ext is None else list(ext.supported_cpu_isas())


def set_cpu_isa(name: str) -> str:
    """Makes the compiled local attention run the instruction set ``name``.

    Args:
        name (str): ``auto`` (the widest supported), ``avx512``, ``avx2``
            or ``baseline``.

    Returns:
        str: The instruction set now in use.

    Raises:
        RuntimeError: Without the compiled extension.
        ValueError: For an unknown name, or one this CPU or build cannot
            run (the message lists those it can).
    """
    if ext is None:
        raise RuntimeError(
            f'mmacmix was built without its compiled kernels ({IMPORT_ERROR})'
        )
    return ext.set_cpu_isa(name)


if ext is not None and os.environ.get(CPU_ISA_ENV):
    try:
        set_cpu_isa(os.environ[CPU_ISA_ENV].strip().lower())
    except ValueError as error:
        raise ValueError(f'{CPU_ISA_ENV}: {error}') from None
