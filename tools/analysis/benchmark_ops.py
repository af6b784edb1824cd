"""Time and memory of ACmix with the fast local attention, side by side.

For each feature-map shape (the four ResNet-50 stage sizes of an
800 x 1216 detection input, batch 1 on the CPU and 2 on CUDA by default)
three cases run forward + backward:

* ``conv``: a plain ``nn.Conv2d(C, C, 3, padding=1, bias=False)``;
* ``acmix``: :class:`mmacmix.models.ACmix` (heads 4, window 7) as the
  package ships it, its attention on :func:`mmacmix.ops.local_attention`
  (the compiled kernel on CPU, the Triton kernels on CUDA);
* ``reference``: the same module with its attention replaced, inside this
  script only, by the official computation (reflection pad, ``unfold`` of
  the 49 neighbours of keys and values, softmax, weighted sum).  The
  official code also unfolds the position encoding, one more 49-fold
  tensor, so this reference is if anything cheaper than the official op.

A second table isolates the attention: ``attention`` and
``attention-reference`` run only the window attention (4 heads of the
input as q, k and v) with the fast function and the unfold computation.

``--tables pvt-conv-path`` times the two forms of ACmix-PVT's convolution
path, factorised (``sra-factorised``: fc and the grouped shift
convolution) against fused into one dense convolution (``sra-fused``), in
whole ACmix-PVT attentions at the four stage sizes of PVT-T at 512 x 512
(1, 2, 5 and 8 heads, spatial reduction 8, 4, 2 and 1).

``--tables builds --other-build PATH`` times the attention of this build
of the compiled CPU kernel against another build of it (an ``_ext*.so``
from another commit), in turns in one process.

``--tables isas`` times the attention on each instruction set the compiled
kernel can run here (``avx512``, ``avx2``, ``baseline``) against the 3x3
convolution, all in turns in one process.  The header names the CPU, the
instruction set the kernel ran (``--cpu-isa`` or ``MMACMIX_CPU_ISA`` force
one), the one PyTorch's own kernels ran, the threads and torch's version.
To measure on an AVX-512 machine what an AVX2-only one would see, restrict
PyTorch, oneDNN and MKL too (each read at start-up)::

    MMACMIX_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
    MKL_ENABLE_INSTRUCTIONS=AVX2 python tools/analysis/benchmark_ops.py

A third table times X-volution against the 3x3 convolution, all cases
taking turns at each shape (see :func:`xvolution_row`): in eval mode, the
forward pass of the training form (``xvolution``: convolution and PSSA
branches, each with its batch norm), of the deployed single operator
(``xvolution-deploy``) and of X-volution (SA) (``xvolution-sa``: global
self-attention branch); in train mode, forward + backward of the training
forms. X-volution (SA) runs where the map has at most
``SA_MAX_TOKENS_CPU`` positions on CPU (its attention is quadratic in
them), everywhere on CUDA.

``--tables san-aggregation`` times SAN's patch aggregation (ACmix-SAN's
attention path, :func:`mmacmix.ops.patch_aggregation`) at the widths of
ACmix-SAN's attention (a quarter of the stage width: 64 to 512 channels, 8
channels a group, 7 x 7 windows) against the 3x3 convolution of the same
width, forward + backward in turns (see :func:`san_aggregation_row`): the
op as dispatched (Triton kernels on CUDA, the PyTorch loop on CPU) and, on
CUDA, the PyTorch loop that SAN ran before. ``--autocast`` gives the dtype
of its tensors (a custom op is not cast by autocast).

``--backbone`` adds whole backbones (1 x 3 x 512 x 512 on CPU,
2 x 3 x 800 x 1216 on CUDA): ACmix-ResNet-50 (fast and reference) against
a plain ResNet-50 on the same code, ACmix-Swin-T against torchvision's
Swin-T, ACmix-SAN-10 against the patchwise SAN-10 it is built on (the same
class with ``with_acmix=False``), and ACmix-PVT-T against mmdet's PVT-T.
Only that last pair needs
mmdet (and with it mmcv's compiled ops, which mmdet imports).  ``--autocast
float16`` runs every forward under ``torch.autocast``.

Time: the median of ``--repeats`` forward + backward passes (5 on CPU, 20
on CUDA by default) after ``--warmup`` untimed ones, each bracketed by
``torch.cuda.synchronize()`` on CUDA.  The first two cases of a row (the
baseline and the fast op) take turns, one timed pass each per round, so
that their ratio compares passes run side by side; the reference is timed
after them. Gradients are dropped between passes.

Memory: the peak extra memory of one forward + backward, each case in a
fresh child process (no allocator cache left over from other cases): the
module, input and output gradient are built, one pass runs on a
quarter-size input to initialise thread pools and kernels, then the peak
during one full-size pass, minus the memory in use just before it, is
reported.  On CUDA that is ``max_memory_allocated`` after
``reset_peak_memory_stats``.  On CPU it is the process's peak resident
memory (``VmHWM``, its mark reset through ``/proc/self/clear_refs``) minus
the resident memory before the pass; without ``clear_refs`` (not Linux)
memory is not reported.  It counts activations kept for the backward,
temporaries, gradients and outputs; not the weights or the input.

Usage::

    python tools/analysis/benchmark_ops.py [--device cpu|cuda] [--quick]
        [--tables acmix attention xvolution]
        [--backbone [resnet swin san pvt]]
        [--autocast none|float16|bfloat16] [--batch N] [--repeats N]
        [--warmup N] [--cpu-isa auto|avx512|avx2|baseline]
"""

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmacmix.demo.pipeline import cpu_name
from mmacmix.models import (
    ACmix,
    ACmixPVT,
    ACmixResNet,
    ACmixSAN,
    ACmixSwinTransformer,
    XVolution,
)
from mmacmix.models import acmix as acmix_module
from mmacmix.models.acmix_pvt import ACmixSRAttention
from mmacmix.models.resnet import Bottleneck, PluggableResNet
from mmacmix.ops import (
    local_attention,
    native,
    patch_aggregation,
    triton_available,
)

# Stage sizes (channels, height, width) of an 800 x 1216 input: strides 4,
# 8, 16, 32; the batch comes from --batch.
STAGES = [(64, 200, 304), (128, 100, 152), (256, 50, 76), (512, 25, 38)]
# PVT-T's stages at 512 x 512, and their heads and spatial reductions.
PVT_STAGES = [(64, 128, 128), (128, 64, 64), (320, 32, 32), (512, 16, 16)]
PVT_ATTENTIONS = {64: (1, 8), 128: (2, 4), 320: (5, 2), 512: (8, 1)}
# Whole backbones: a CPU-sized input, and the detection input on CUDA.
BACKBONE_SHAPES = {'cpu': (1, 3, 512, 512), 'cuda': (2, 3, 800, 1216)}
OP_CASES = ('conv', 'acmix', 'reference')
ATTENTION_CASES = ('conv', 'attention', 'attention-reference')
BACKBONE_TABLES = {
    'resnet': ('resnet50', 'acmix-r50', 'acmix-r50-reference'),
    'swin': ('swin-t', 'acmix-swin-t'),
    'pvt': ('pvt-t', 'acmix-pvt-t'),
    'san': ('san10', 'acmix-san10'),
}
# X-volution table: (case, pass) columns, all timed in turns.
XVOLUTION_CASES = (
    ('conv', 'forward'),
    ('xvolution', 'forward'),
    ('xvolution-deploy', 'forward'),
    ('xvolution-sa', 'forward'),
    ('conv', 'train'),
    ('xvolution', 'train'),
    ('xvolution-sa', 'train'),
)
# Global attention over more positions takes minutes per pass on a CPU.
SA_MAX_TOKENS_CPU = 4096
TABLES = {
    'acmix': OP_CASES,
    'attention': ATTENTION_CASES,
    'xvolution': XVOLUTION_CASES,
    # Needs --other-build: this build of the CPU kernel against another.
    'builds': ('attention-other-build', 'attention'),
    'pvt-conv-path': ('sra-factorised', 'sra-fused'),
    # Filled in by main(): the conv and the attention on each instruction
    # set the kernel can run.
    'isas': (),
    'san-aggregation': ('conv', 'aggregation', 'aggregation-loop'),
}
TABLE_STAGES = {'pvt-conv-path': PVT_STAGES}


def unfold_attention(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int = 7, stride: int = 1
) -> Tensor:
    """Local attention computed as the official ACmix code does.

    Keys and values are reflection-padded and their ``kernel_size ** 2``
    neighbourhoods materialised with ``unfold``.  Same contract as
    :func:`mmacmix.ops.local_attention` while the pad is smaller than the
    map.
    """
    n, d, h, w = k.shape
    ho, wo = q.shape[-2:]
    pad = kernel_size // 2

    def neighbours(x: Tensor) -> Tensor:
        x = F.pad(x, (pad, pad, pad, pad), mode='reflect')
        x = F.unfold(x, kernel_size, stride=stride)
        return x.view(n, d, kernel_size**2, ho, wo)

    logits = (q.unsqueeze(2) * neighbours(k)).sum(1)
    weights = logits.softmax(dim=1)
    return (weights.unsqueeze(1) * neighbours(v)).sum(2)


@contextlib.contextmanager
def reference_attention() -> Iterator[list]:
    """Runs every ACmix op on :func:`unfold_attention` while active.

    Yields a list that receives one entry per call, so a caller can check
    that the swap reached the op.
    """
    calls: list = []
    original = acmix_module.local_attention

    def counted(*args, **kwargs) -> Tensor:
        calls.append(None)
        return unfold_attention(*args, **kwargs)

    acmix_module.local_attention = counted
    try:
        yield calls
    finally:
        acmix_module.local_attention = original


class OtherBuild(torch.autograd.Function):
    """The local attention on a second build of the compiled CPU kernel.

    ``--other-build PATH`` loads it (an ``_ext*.so`` built from another
    commit, for example), so that two builds are timed side by side in one
    process, in turns, with the rest of the code the same.
    """

    ext = None

    @staticmethod
    def load(path: str) -> None:
        # The last part of the name must stay `_ext` (it names the init
        # function); the package part keeps Python from handing back the
        # already imported mmacmix.ops._ext.
        spec = importlib.util.spec_from_file_location(
            'mmacmix_other_build._ext', path
        )
        OtherBuild.ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(OtherBuild.ext)
        # Both builds run the same instruction set (builds from before the
        # variants have one, chosen when compiled).
        if hasattr(OtherBuild.ext, 'set_cpu_isa'):
            OtherBuild.ext.set_cpu_isa(native.cpu_isa())

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (x.contiguous() for x in (q, k, v))
        out, lse = OtherBuild.ext.local_attention_forward(q, k, v, 7, 1)
        ctx.save_for_backward(q, k, v, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, lse = ctx.saved_tensors
        return tuple(
            OtherBuild.ext.local_attention_backward(
                grad_out.contiguous(), q, k, v, lse, 7, 1
            )
        )


class AttentionOnly(nn.Module):
    """The attention path alone: the input's 4 heads as q, k and v."""

    def __init__(self, function: Callable[..., Tensor], heads: int = 4):
        super().__init__()
        self.function = function
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.reshape(b * self.heads, c // self.heads, h, w)
        out = self.function(t * (c // self.heads) ** -0.5, t, t)
        return out.reshape(b, c, h, w)


def attention_on_isa(q: Tensor, k: Tensor, v: Tensor, *, isa: str) -> Tensor:
    """The compiled local attention on instruction set ``isa``: set before
    the forward pass and again, through a hook, before the backward."""
    native.set_cpu_isa(isa)
    out = local_attention(q, k, v, impl='native')
    if out.requires_grad:
        out.register_hook(lambda grad: native.set_cpu_isa(isa) and None)
    return out


class SRAttentionOnMaps(nn.Module):
    """An ACmix-PVT attention with PVT-T's heads and reduction for the
    width, on ``(B, C, H, W)`` maps, its convolution path in one form."""

    def __init__(self, channels: int, fused: bool) -> None:
        super().__init__()
        heads, sr_ratio = PVT_ATTENTIONS[channels]
        self.attention = ACmixSRAttention(channels, heads, sr_ratio)
        self.attention.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        out = self.attention(x.flatten(2).transpose(1, 2), (h, w))
        return out.transpose(1, 2).reshape(b, c, h, w)


class PlainResNet(PluggableResNet):
    """A plain ResNet-50 on the same code, for scale."""

    arch_settings = {50: (Bottleneck, (3, 4, 6, 3))}


def build_case(
    case: str, shape: tuple[int, ...], device: str
) -> tuple[nn.Module, Tensor, Callable[[], contextlib.AbstractContextManager]]:
    """Module, input and context (reference swap or none) of one case."""
    torch.manual_seed(0)
    channels = shape[1]
    if case == 'conv':
        module = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    elif case == 'attention':
        module = AttentionOnly(local_attention)
    elif case == 'attention-other-build':
        module = AttentionOnly(OtherBuild.apply)
    elif case.startswith('attention-isa-'):
        module = AttentionOnly(
            functools.partial(
                attention_on_isa, isa=case.removeprefix('attention-isa-')
            )
        )
    elif case == 'attention-reference':
        module = AttentionOnly(unfold_attention)
    elif case in ('acmix', 'reference'):
        module = ACmix(channels, channels, num_heads=4, attn_kernel_size=7)
    elif case in ('xvolution', 'xvolution-deploy'):
        module = XVolution(channels, channels)
        if case == 'xvolution-deploy':
            module.switch_to_deploy()
    elif case == 'xvolution-sa':
        module = XVolution(channels, channels, attention='global')
    elif case == 'resnet50':
        module = PlainResNet(depth=50)
    elif case in ('acmix-r50', 'acmix-r50-reference'):
        module = ACmixResNet(depth=50)
    elif case == 'swin-t':
        # torchvision's Swin-T: a plain Swin that needs no mmcv ops.
        from torchvision.models import swin_t

        module = swin_t().features
    elif case == 'acmix-swin-t':
        module = ACmixSwinTransformer(arch='tiny')
    elif case == 'pvt-t':
        from mmdet.models.backbones.pvt import PyramidVisionTransformer

        module = PyramidVisionTransformer(num_layers=[2, 2, 2, 2])
    elif case == 'acmix-pvt-t':
        module = ACmixPVT(arch='tiny')
    elif case in ('sra-factorised', 'sra-fused'):
        module = SRAttentionOnMaps(channels, fused=case == 'sra-fused')
    elif case in ('san10', 'acmix-san10'):
        module = ACmixSAN(arch=10, with_acmix=case == 'acmix-san10')
    else:
        raise ValueError(f'unknown case {case!r}')
    module = module.to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    if case in ('reference', 'acmix-r50-reference'):
        return module, x, reference_attention
    return module, x, contextlib.nullcontext


def forward_backward(
    module: nn.Module, x: Tensor, autocast: torch.dtype | None = None
) -> Tensor:
    """One training pass, the forward under ``autocast`` if given; returns
    the (first) output, detached."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast(
        x.device.type, dtype=autocast, enabled=autocast is not None
    ):
        out = module(x)
    outs = out if isinstance(out, (tuple, list)) else [out]
    # A sum's gradient is an expanded scalar: it allocates nothing.
    sum(o.sum() for o in outs).backward()
    return outs[0].detach()


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_cases(
    cases: tuple[str, ...],
    shape: tuple[int, ...],
    device: str,
    repeats: int,
    warmup: int,
    autocast: torch.dtype | None = None,
) -> dict[str, tuple[float, Tensor]]:
    """Median seconds of forward + backward of each case, and its output.

    Every case is warmed up first; the timed passes then take turns (one
    pass of each case per round), so that a slow spell of a shared machine
    or the first passes of a fresh process weigh on all cases alike.
    """
    built = {case: build_case(case, shape, device) for case in cases}
    outputs, times = {}, {case: [] for case in cases}
    for case, (module, x, context) in built.items():
        with context() as calls:
            for _ in range(warmup):
                outputs[case] = forward_backward(module, x, autocast)
        if calls is not None and not calls:
            raise RuntimeError(
                'the reference attention never ran: was ACmix '
                'changed to call local_attention differently?'
            )
    for _ in range(repeats):
        for case, (module, x, context) in built.items():
            with context():
                synchronize(device)
                start = time.perf_counter()
                forward_backward(module, x, autocast)
                synchronize(device)
                times[case].append(time.perf_counter() - start)
    return {
        case: (statistics.median(times[case]), outputs[case]) for case in cases
    }


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory_here(
    case: str,
    shape: tuple[int, ...],
    device: str,
    autocast: torch.dtype | None = None,
) -> float | None:
    """Peak extra MiB of one pass, in this process (see module docstring)."""
    small = (*shape[:2], *(max(1, math.ceil(s / 2)) for s in shape[2:]))
    module, x_small, context = build_case(case, small, device)
    x = torch.randn(shape, device=device, requires_grad=True)
    with context():
        forward_backward(module, x_small, autocast)
        module.zero_grad(set_to_none=True)
        del x_small
        gc.collect()
        if device.startswith('cuda'):
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            forward_backward(module, x, autocast)
            synchronize(device)
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        try:
            with open('/proc/self/clear_refs', 'w') as refs:
                refs.write('5')  # resets the peak-RSS mark to the current RSS
        except OSError:
            return None
        before = _status_kb('VmRSS')
        forward_backward(module, x, autocast)
        return (_status_kb('VmHWM') - before) / 1024


def measure_memory(
    case: str, shape: tuple[int, ...], args: argparse.Namespace
) -> float | None:
    """Runs :func:`measure_memory_here` in a fresh child process."""
    spec = {
        'case': case,
        'shape': shape,
        'device': args.device,
        'autocast': args.autocast,
    }
    command = [
        sys.executable,
        __file__,
        '--threads',
        str(torch.get_num_threads()),
        '--child-memory',
        json.dumps(spec),
        *(['--other-build', args.other_build] if args.other_build else []),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'memory child for {case} failed:\n{result.stderr}')
    return json.loads(result.stdout.strip().splitlines()[-1])['mib']


def run_shape(
    shape: tuple[int, ...], cases: tuple[str, ...], args: argparse.Namespace
) -> dict:
    """Times, memory and output agreement of the cases at one shape."""
    row: dict = {'shape': 'x'.join(map(str, shape))}
    # The reference, slow and gigabytes large, is timed apart: between the
    # passes of the two closest cases it would flush the caches and the
    # allocator's free memory for both.
    autocast = AUTOCAST[args.autocast]
    timed = {
        case: result
        for group in (cases[:2], cases[2:])
        if group
        for case, result in time_cases(
            group, shape, args.device, args.repeats, args.warmup, autocast
        ).items()
    }
    for case, (seconds, _) in timed.items():
        row[case] = {
            'seconds': seconds,
            'mib': None
            if args.no_memory
            else measure_memory(case, shape, args),
        }
        print(f'  {row["shape"]} {case}: {seconds * 1e3:.1f} ms', flush=True)
    if len(cases) == 3:
        fast, reference = timed[cases[1]][1], timed[cases[2]][1]
        row['max_abs_diff'] = (fast - reference).abs().max().item()
    return row


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return 'n/a'
    return f'{a / b:.2f}x'


def mib(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.0f}'


def print_rows(table: list[list[str]]) -> None:
    """Prints a header line and rows of cells, right-aligned in columns."""
    widths = [
        max(len(line[i]) for line in table) for i in range(len(table[0]))
    ]
    for index, line in enumerate(table):
        print(' | '.join(cell.rjust(w) for cell, w in zip(line, widths)))
        if index == 0:
            print('-+-'.join('-' * w for w in widths))


def print_table(rows: list[dict], cases: tuple[str, ...]) -> None:
    """Prints times (ms), memory (MiB) and ratios, one row per shape.

    ``cases`` are a baseline, the fast op and, optionally, its reference.
    """
    base, fast, *reference = cases
    header = [
        'shape',
        *(f'{case} ms' for case in cases),
        f'{fast}/{base}',
        *(f'{case}/{fast}' for case in reference),
        *(f'{case} MiB' for case in cases),
        f'mem {fast}/{base}',
        *(f'mem {case}/{fast}' for case in reference),
        *(['max|diff|'] if reference else []),
    ]
    table = [header]
    for row in rows:
        t = [row[case]['seconds'] for case in cases]
        m = [row[case]['mib'] for case in cases]
        table.append(
            [
                row['shape'],
                *(f'{seconds * 1e3:.1f}' for seconds in t),
                ratio(t[1], t[0]),
                *(ratio(t[2], t[1]) for _ in reference),
                *(mib(value) for value in m),
                ratio(m[1], m[0]),
                *(ratio(m[2], m[1]) for _ in reference),
                *([f'{row["max_abs_diff"]:.1e}'] if reference else []),
            ]
        )
    print_rows(table)


def time_in_turns(
    passes: dict[object, Callable[[], object]],
    device: str,
    repeats: int,
    warmup: int,
) -> dict[object, float]:
    """Median seconds of each pass, all warmed up, then timed in turns."""
    for run in passes.values():
        for _ in range(warmup):
            run()
    times = {key: [] for key in passes}
    for _ in range(repeats):
        for key, run in passes.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def xvolution_row(shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    """Times the X-volution columns at one shape, all in turns.

    ``forward`` passes run in eval mode without gradients, ``train``
    passes are forward + backward in train mode. The training and deployed
    forms start from the same weights, so their eval outputs agree; their
    largest difference is reported.
    """
    tokens = shape[2] * shape[3]
    columns = [
        (case, kind)
        for case, kind in XVOLUTION_CASES
        if case != 'xvolution-sa'
        or args.device == 'cuda'
        or tokens <= SA_MAX_TOKENS_CPU
    ]
    modules = {
        case: build_case(case, shape, args.device)[0] for case, _ in columns
    }
    x = torch.randn(shape, device=args.device, requires_grad=True)
    autocast = AUTOCAST[args.autocast]
    # Before any train pass moves the training form's running statistics.
    with torch.no_grad():
        trained = modules['xvolution'].eval()(x)
        deployed = modules['xvolution-deploy'].eval()(x)
    max_abs_diff = (trained - deployed).abs().max().item()

    def run(case: str, kind: str) -> Tensor:
        module = modules[case].train(kind == 'train')
        if kind == 'train':
            return forward_backward(module, x, autocast)
        with (
            torch.no_grad(),
            torch.autocast(
                x.device.type, dtype=autocast, enabled=autocast is not None
            ),
        ):
            return module(x)

    times = time_in_turns(
        {column: (lambda c=column: run(*c)) for column in columns},
        args.device,
        args.repeats,
        args.warmup,
    )
    row = {
        'shape': 'x'.join(map(str, shape)),
        'times': times,
        'max_abs_diff': max_abs_diff,
    }
    for (case, kind), seconds in times.items():
        print(f'  {row["shape"]} {case} {kind}: {seconds * 1e3:.1f} ms')
    return row


def isa_row(shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    """Times the conv and the attention on each instruction set, in turns."""
    cases = TABLES['isas']
    built = {case: build_case(case, shape, args.device) for case in cases}
    active = native.cpu_isa()
    try:
        times = time_in_turns(
            {
                case: functools.partial(forward_backward, module, x)
                for case, (module, x, _) in built.items()
            },
            args.device,
            args.repeats,
            args.warmup,
        )
    finally:
        native.set_cpu_isa(active)
    row = {'shape': 'x'.join(map(str, shape)), 'times': times}
    for case, seconds in times.items():
        print(f'  {row["shape"]} {case}: {seconds * 1e3:.1f} ms', flush=True)
    return row


def print_isa_table(rows: list[dict]) -> None:
    """Prints the attention per instruction set (ms) and its ratio to the
    conv and to the widest instruction set."""
    base, *cases = TABLES['isas']
    header = [
        'shape',
        *(f'{case} ms' for case in TABLES['isas']),
        *(f'{case.removeprefix("attention-isa-")}/conv' for case in cases),
        *(
            f'{case.removeprefix("attention-isa-")}/'
            f'{cases[0].removeprefix("attention-isa-")}'
            for case in cases[1:]
        ),
    ]
    table = [header]
    for row in rows:
        t = row['times']
        table.append(
            [
                row['shape'],
                *(f'{t[case] * 1e3:.1f}' for case in TABLES['isas']),
                *(ratio(t[case], t[base]) for case in cases),
                *(ratio(t[case], t[cases[0]]) for case in cases[1:]),
            ]
        )
    print_rows(table)


def machine_line(device: str) -> str:
    """CPU (or GPU), the instruction sets the kernels ran, threads, torch."""
    if device == 'cuda':
        kernel = f'Triton kernels: {triton_available("cuda")}'
        where = torch.cuda.get_device_name()
    else:
        isa, supported = native.cpu_isa(), native.supported_cpu_isas()
        kernel = (
            f'compiled kernel on {isa} (of {", ".join(supported)})'
            if isa
            else 'compiled kernel missing (PyTorch loop)'
        )
        where = cpu_name()
    restricted = ', '.join(
        f'{name}={os.environ[name]}'
        for name in ('ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS')
        if os.environ.get(name)
    )
    return (
        f'{where}; local attention: {kernel}; PyTorch CPU kernels: '
        f'{torch.backends.cpu.get_cpu_capability()}'
        f'{f" ({restricted})" if restricted else ""}; '
        f'{torch.get_num_threads()} threads; torch {torch.__version__}'
    )


def print_xvolution_table(rows: list[dict]) -> None:
    """Prints the X-volution times (ms) and their ratios to the conv."""
    header = [
        'shape',
        *(f'{case} {kind} ms' for case, kind in XVOLUTION_CASES),
        'deploy/conv fwd',
        'deploy/xvolution fwd',
        'sa/conv fwd',
        'xvolution/conv train',
        'sa/conv train',
        'max|diff|',
    ]
    table = [header]
    for row in rows:
        t = row['times']
        table.append(
            [
                row['shape'],
                *(
                    f'{t[column] * 1e3:.1f}' if column in t else 'skipped'
                    for column in XVOLUTION_CASES
                ),
                ratio(
                    t[('xvolution-deploy', 'forward')], t[('conv', 'forward')]
                ),
                ratio(
                    t[('xvolution-deploy', 'forward')],
                    t[('xvolution', 'forward')],
                ),
                ratio(
                    t.get(('xvolution-sa', 'forward')), t[('conv', 'forward')]
                ),
                ratio(t[('xvolution', 'train')], t[('conv', 'train')]),
                ratio(t.get(('xvolution-sa', 'train')), t[('conv', 'train')]),
                f'{row["max_abs_diff"]:.1e}',
            ]
        )
    print_rows(table)


def san_aggregation_row(
    shape: tuple[int, ...], args: argparse.Namespace
) -> dict:
    """Times SAN's patch aggregation against a 3x3 conv at one shape.

    ``shape`` is ``(B, C, H, W)`` of the values; the weights are ``(B, C /
    8, 49, H, W)``. All columns are forward + backward (gradients of the
    conv's input and weight, of the values and weights), timed in turns,
    in the dtype ``--autocast`` names (float32 for none). On CUDA the peak
    extra memory of one pass is measured in this process.
    """
    dtype = AUTOCAST[args.autocast] or torch.float32
    device, kernel_size = args.device, 7
    b, channels, h, w = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    conv = conv.to(device, dtype)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    weights = torch.randn(
        b, channels // 8, kernel_size**2, h, w, device=device, dtype=dtype
    ).requires_grad_()

    def aggregate(impl: str) -> Tensor:
        x.grad = weights.grad = None
        out = patch_aggregation(x, weights, kernel_size, impl=impl)
        out.sum().backward()
        return out.detach()

    def convolve() -> Tensor:
        conv.zero_grad(set_to_none=True)
        x.grad = None
        out = conv(x)
        out.sum().backward()
        return out.detach()

    passes = {'conv': convolve, 'aggregation': lambda: aggregate('auto')}
    if device == 'cuda':  # on the CPU 'auto' is the loop itself
        passes['aggregation-loop'] = lambda: aggregate('pytorch')
    times = time_in_turns(passes, device, args.repeats, args.warmup)
    row: dict = {'shape': 'x'.join(map(str, shape)), 'dtype': str(dtype)}
    for case, run in passes.items():
        mib = None
        if device == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        row[case] = {'seconds': times[case], 'mib': mib}
        print(f'  {row["shape"]} {case}: {times[case] * 1e3:.2f} ms')
    if 'aggregation-loop' in passes:
        fast = aggregate('auto').float()
        row['max_abs_diff'] = (
            (fast - aggregate('pytorch').float()).abs().max().item()
        )
    return row


def print_san_aggregation_table(rows: list[dict]) -> None:
    """Prints the aggregation's times (ms), memory (MiB) and ratios."""
    cases = [c for c in TABLES['san-aggregation'] if c in rows[0]]
    header = [
        'shape',
        *(f'{case} ms' for case in cases),
        *(f'{case}/conv' for case in cases[1:]),
        *(f'{case} MiB' for case in cases),
        *(['max|diff|'] if 'max_abs_diff' in rows[0] else []),
    ]
    table = [header]
    for row in rows:
        t = [row[case]['seconds'] for case in cases]
        table.append(
            [
                row['shape'],
                *(f'{seconds * 1e3:.2f}' for seconds in t),
                *(ratio(seconds, t[0]) for seconds in t[1:]),
                *(mib(row[case]['mib']) for case in cases),
                *(
                    [f'{row["max_abs_diff"]:.1e}']
                    if 'max_abs_diff' in row
                    else []
                ),
            ]
        )
    print_rows(table)


AUTOCAST = {'none': None, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--batch',
        type=int,
        help='batch of the op shapes (default: 1 on cpu, 2 on cuda)',
    )
    parser.add_argument(
        '--autocast',
        default='none',
        choices=sorted(AUTOCAST),
        help='run the forward passes under torch.autocast of this dtype',
    )
    parser.add_argument(
        '--quick', action='store_true', help='only the two smallest shapes'
    )
    parser.add_argument(
        '--backbone',
        nargs='*',
        choices=sorted(BACKBONE_TABLES),
        help='whole backbones, forward + backward at 1x3x512x512 on cpu and '
        '2x3x800x1216 on cuda: ACmix-ResNet-50 (fast and reference) against '
        'a plain ResNet-50 on the same code (resnet), ACmix-Swin-T against '
        "torchvision's Swin-T (swin), ACmix-SAN-10 against the patchwise "
        "SAN-10 (san), ACmix-PVT-T against mmdet's PVT-T (pvt); no name: "
        'all',
    )
    parser.add_argument(
        '--threads', type=int, help='torch threads (default: torch default)'
    )
    parser.add_argument(
        '--tables',
        nargs='*',
        choices=sorted(TABLES),
        default=['acmix', 'attention', 'xvolution'],
        help='which tables to run (default: acmix attention xvolution; '
        'none with --backbone for the backbones alone)',
    )
    parser.add_argument(
        '--repeats', type=int, help='timed passes (default: 5 cpu, 20 cuda)'
    )
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--other-build',
        help="for --tables builds: another build's mmacmix/ops/_ext*.so, "
        'timed against this one',
    )
    parser.add_argument(
        '--cpu-isa',
        choices=['auto', 'avx512', 'avx2', 'baseline'],
        help='instruction set of the compiled local attention (default: '
        'MMACMIX_CPU_ISA, else the widest the CPU supports)',
    )
    parser.add_argument(
        '--no-reference',
        action='store_true',
        help='skip the unfold (official) forms, the slowest cases',
    )
    parser.add_argument(
        '--no-memory',
        action='store_true',
        help='skip the memory measurements (a child process per case)',
    )
    parser.add_argument('--child-memory', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_cuda = args.device == 'cuda'
    if args.repeats is None:
        args.repeats = 20 if on_cuda else 5
    if args.batch is None:
        args.batch = 2 if on_cuda else 1
    if args.repeats < 1 or args.warmup < 1 or args.batch < 1:
        parser.error('--repeats, --warmup and --batch must be >= 1')
    if args.backbone == []:
        args.backbone = sorted(BACKBONE_TABLES)
    if 'builds' in args.tables and not args.other_build:
        parser.error('--tables builds needs --other-build')
    if on_cuda and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device')
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Randomly initialised networks can hit denormals, which are very slow
    # on CPU and would time the hardware's microcode rather than the ops.
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_isa:
        try:
            native.set_cpu_isa(args.cpu_isa)
        except (RuntimeError, ValueError) as error:
            sys.exit(f'--cpu-isa {args.cpu_isa}: {error}')
    if args.other_build:
        OtherBuild.load(args.other_build)
    TABLES['isas'] = (
        'conv',
        *(f'attention-isa-{isa}' for isa in native.supported_cpu_isas()[::-1]),
    )
    if args.child_memory:
        spec = json.loads(args.child_memory)
        value = measure_memory_here(
            spec['case'],
            tuple(spec['shape']),
            spec['device'],
            AUTOCAST[spec['autocast']],
        )
        print(json.dumps({'mib': value}))
        return

    print(machine_line(args.device))
    print(
        f'autocast {args.autocast}; median of {args.repeats} '
        f'forward+backward after {args.warmup} warm-up, cases in turns',
        flush=True,
    )
    shapes = [(args.batch, *stage) for stage in STAGES]
    if args.quick:
        shapes = shapes[2:]
    for name in args.tables:
        print()
        if name == 'xvolution':
            print_xvolution_table([xvolution_row(s, args) for s in shapes])
        elif name == 'isas':
            print_isa_table([isa_row(s, args) for s in shapes])
        elif name == 'san-aggregation':
            print_san_aggregation_table(
                [san_aggregation_row(s, args) for s in shapes]
            )
        else:
            table_shapes = shapes
            if name in TABLE_STAGES:
                table_shapes = [(args.batch, *s) for s in TABLE_STAGES[name]]
            cases = TABLES[name]
            if args.no_reference:
                cases = cases[:2]
            rows = [run_shape(s, cases, args) for s in table_shapes]
            print_table(rows, cases)
        print()
    for name in args.backbone or []:
        cases = BACKBONE_TABLES[name]
        if args.no_reference:
            cases = cases[:2]
        rows = [run_shape(BACKBONE_SHAPES[args.device], cases, args)]
        print()
        print_table(rows, cases)
        print()


if __name__ == '__main__':
    main()
