"""Static gates for Triton kernels: compiled for Hopper, no GPU needed.

An op's host code is run on small CPU tensors with its kernels replaced by
recorders (`record_launches`), so the gates see exactly the launches the
op makes: the arguments, the constexprs and, for an autotuned kernel, every
configuration that its pruning keeps.  Each launch is then specialised the
way Triton's launcher would specialise it on a GPU (integers equal to 1
become constants, multiples of 16 and aligned pointers get divisibility
hints) and compiled by Triton's own compiler for sm_90a (`compile_launch`).
The result (`Compiled`) carries what the tests assert:

* registers per thread, stack frame and spill bytes, from the ``ptxas -v``
  log of the compile (each kernel is compiled afresh, so that Triton's
  cache cannot skip ptxas);
* the dynamic shared memory Triton allocates;
* the blocked layouts of the TTGIR (which axes the warps split);
* the PTX, with its integer divisions and remainders, and those of them
  inside a loop.

`budget_violations` turns these into messages against a budget. To gate
another op, record its launches on small CPU tensors and assert that
every compiled launch has no violation, as test_triton_gates.py does.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

# Compute capability 9.0 with 32 lanes: Triton's NVIDIA backend names every
# target from 9.0 on with the 'a' suffix, so PTX and ptxas get sm_90a.
HOPPER = GPUTarget('cuda', 90, 32)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the op makes it, for one configuration."""

    fn: JITFunction
    args: tuple
    kwargs: dict = field(hash=False)

    @property
    def name(self) -> str:
        return self.fn.fn.__name__


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records
    the launch (once per configuration of an autotuned kernel)."""

    def __init__(self, kernel: JITFunction | Autotuner, sink: list[Launch]):
        self.kernel = kernel
        self.sink = sink

    def __getitem__(self, grid) -> Callable[..., None]:
        return self._record

    def _record(self, *args, **kwargs) -> None:
        kernel = self.kernel
        if isinstance(kernel, Autotuner):
            # The configurations Autotuner.run would choose among.
            configs = kernel.configs
            if len(configs) > 1:
                kernel.nargs = dict(zip(kernel.arg_names, args))
                try:
                    configs = kernel.prune_configs(kwargs)
                finally:
                    kernel.nargs = None
            for config in configs:
                self.sink.append(
                    Launch(kernel.fn, args, {**kwargs, **config.all_kwargs()})
                )
        else:
            self.sink.append(Launch(kernel, args, kwargs))


def record_launches(
    module: Any, names: Iterable[str], run: Callable[[], object]
) -> list[Launch]:
    """Launches that ``run()`` makes through ``module``'s kernels ``names``.

    Args:
        module: The module whose attributes ``names`` are the kernels the
            op launches (``@triton.jit`` or ``@triton.autotune`` objects).
        names: Those attributes.
        run: Runs the op's host code (on CPU tensors: nothing is launched).

    Returns:
        One `Launch` per launch and configuration, in order.
    """
    launches: list[Launch] = []
    names = list(names)
    originals = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, _Recorder(kernel, launches))
        run()
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return launches


@dataclass
class Compiled:
    """What the gates read from one kernel compiled for sm_90a."""

    name: str
    specialisation: str
    num_warps: int
    registers: int
    stack: int
    spill_stores: int
    spill_loads: int
    shared: int
    ptx: str
    ttgir: str
    cubin: bytes

    def div_rem(self) -> int:
        """Integer division and remainder instructions in the PTX."""
        return len(_integer_div_rem(self.ptx.splitlines()))

    def div_rem_in_loops(self) -> int:
        """Of those, the ones inside a loop (between a label and a later
        branch back to it)."""
        lines = self.ptx.splitlines()
        labels = {
            m.group(1): n
            for n, line in enumerate(lines)
            if (m := re.match(r'^(\$\w+):', line.strip()))
        }
        inside: set[int] = set()
        for n, line in enumerate(lines):
            m = re.search(r'\bbra(?:\.uni)?\s+(\$\w+);', line)
            if m and labels.get(m.group(1), n + 1) <= n:
                inside.update(range(labels[m.group(1)], n + 1))
        return sum(n in inside for n in _integer_div_rem(lines))

    def atomics(self) -> list[str]:
        """Opcodes of the atomic and reduction instructions in the PTX."""
        return re.findall(
            r'^\s*(?:@!?%p\d+\s+)?((?:atom|red)\.[\w.]+)',
            self.ptx,
            re.M,
        )

    def warps_per_cta(self) -> list[tuple[int, ...]]:
        """``warpsPerCTA`` of every blocked layout in the TTGIR."""
        return [
            tuple(int(x) for x in m.split(','))
            for m in re.findall(r'warpsPerCTA = \[([\d, ]+)\]', self.ttgir)
        ]

    def row(self) -> str:
        """One markdown table row."""
        return (
            f'| {self.name} | {self.specialisation} | {self.num_warps} | '
            f'{self.registers} | {self.spill_stores + self.spill_loads} | '
            f'{self.stack} | '
            f'{self.shared} | {self.div_rem()} | {self.div_rem_in_loops()} |'
        )


def budget_violations(
    compiled: Compiled,
    *,
    registers: int,
    shared_bytes: int = 0,
    div_rem_in_loops: int = 0,
) -> list[str]:
    """What in ``compiled`` breaks a budget (empty when nothing does).

    Checked: the PTX targets sm_90a and a cubin came out; no spill stores
    or loads and no stack frame; at most ``registers`` registers per
    thread and ``shared_bytes`` of shared memory; at most
    ``div_rem_in_loops`` integer divisions or remainders inside loops.
    """
    where = f'{compiled.name} [{compiled.specialisation}]'
    found = []
    if not re.search(r'^\.target sm_90a$', compiled.ptx, re.M):
        found.append('the PTX does not target sm_90a')
    if not compiled.cubin:
        found.append('no cubin')
    if compiled.spill_stores or compiled.spill_loads:
        found.append(
            f'spills: {compiled.spill_stores} bytes stored, '
            f'{compiled.spill_loads} loaded'
        )
    if compiled.stack:
        found.append(f'a stack frame of {compiled.stack} bytes')
    if compiled.registers > registers:
        found.append(f'{compiled.registers} registers > {registers}')
    if compiled.shared > shared_bytes:
        found.append(f'{compiled.shared} bytes of shared memory')
    if compiled.div_rem_in_loops() > div_rem_in_loops:
        found.append(
            f'{compiled.div_rem_in_loops()} integer div/rem inside loops'
        )
    return [f'{where}: {problem}' for problem in found]


TABLE_HEADER = (
    '| kernel | specialisation | warps | registers | spill bytes | '
    'stack bytes | shared bytes | div/rem in PTX | div/rem in loops |\n'
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |'
)


def _integer_div_rem(lines: Sequence[str]) -> list[int]:
    pattern = re.compile(r'^\s*(?:@!?%p\d+\s+)?(?:div|rem)\.[su](?:32|64)\b')
    return [n for n, line in enumerate(lines) if pattern.match(line)]


def specialise(launch: Launch, target: GPUTarget = HOPPER):
    """Signature, constexprs, attributes and options of ``launch`` as
    Triton's launcher derives them from its arguments."""
    fn = launch.fn
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    return attrs, constexprs, signature, options


def describe(launch: Launch) -> str:
    """Short text of a launch's specialisation: pointer dtypes, pointers
    not known to be 16-byte aligned, the integers Triton specialised
    (``=1`` constant, ``%16`` divisible by 16), constexprs and warps."""
    attrs, constexprs, signature, options = specialise(launch)
    parts, unaligned = [], []
    for index, (name, kind) in enumerate(signature.items()):
        if kind.startswith('*'):
            if not attrs.get((index,)):
                unaligned.append(name)
        elif kind == 'constexpr':
            parts.append(f'{name}={constexprs[(index,)]}')
        elif attrs.get((index,)):
            parts.append(f'{name}%16')
    dtypes = sorted({k[1:] for k in signature.values() if k.startswith('*')})
    if unaligned:
        parts.insert(0, 'unaligned=' + ','.join(unaligned))
    return ' '.join(['/'.join(dtypes), *parts, f'warps={options.num_warps}'])


_CACHE: dict[tuple, Compiled] = {}


def compile_launch(launch: Launch, target: GPUTarget = HOPPER) -> Compiled:
    """Compiles ``launch`` for ``target`` with Triton's compiler.

    Always compiled afresh (Triton's cache would skip ptxas and its log);
    each specialisation once per process.
    """
    attrs, constexprs, signature, options = specialise(launch, target)
    key = (
        launch.fn.cache_key,
        str(sorted(signature.items())),
        str(sorted(constexprs.items(), key=str)),
        str(sorted(attrs.items())),
        str(sorted(options.__dict__.items(), key=str)),
        target,
    )
    if key in _CACHE:
        return _CACHE[key]
    source = ASTSource(launch.fn, signature, constexprs, attrs)
    log = io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                source, target=target, options=options.__dict__
            )
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    usage = _ptxas_usage(log.getvalue())
    compiled = Compiled(
        name=launch.name,
        specialisation=describe(launch),
        num_warps=kernel.metadata.num_warps,
        shared=kernel.metadata.shared,
        ptx=kernel.asm['ptx'],
        ttgir=kernel.asm['ttgir'],
        cubin=kernel.asm['cubin'],
        **usage,
    )
    _CACHE[key] = compiled
    return compiled


def _ptxas_usage(log: str) -> dict[str, int]:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log."""
    registers = re.search(r'Used (\d+) registers', log)
    frame = re.search(
        r'(\d+) bytes stack frame, (\d+) bytes spill stores, '
        r'(\d+) bytes spill loads',
        log,
    )
    if registers is None or frame is None:
        raise RuntimeError(f'no resource usage in the ptxas log:\n{log}')
    stack, stores, loads = (int(x) for x in frame.groups())
    return {
        'registers': int(registers.group(1)),
        'stack': stack,
        'spill_stores': stores,
        'spill_loads': loads,
    }
