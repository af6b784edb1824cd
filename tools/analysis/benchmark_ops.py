"""Time and memory of ACmix with the fast local attention, side by side.

For each feature-map shape (the stage sizes of an 800 x 1216 detection
input by default) three cases run forward + backward:

* ``conv``: a plain ``nn.Conv2d(C, C, 3, padding=1, bias=False)``;
* ``acmix``: :class:`mmacmix.models.ACmix` (heads 4, window 7) as the
  package ships it, its attention on :func:`mmacmix.ops.local_attention`;
* ``reference``: the same module with its attention replaced, inside this
  script only, by the official computation (reflection pad, ``unfold`` of
  the 49 neighbours of keys and values, softmax, weighted sum).  The
  official code also unfolds the position encoding, one more 49-fold
  tensor, so this reference is if anything cheaper than the official op.

A second table isolates the attention: ``attention`` and
``attention-reference`` run only the window attention (4 heads of the
input as q, k and v) with the fast function and the unfold computation.

A third table compares X-volution's training form (``xvolution``) with its
deployed single-operator form (``xvolution-deploy``), both in eval mode.

``--backbone`` adds a whole ACmix-ResNet-50 at 1 x 3 x 512 x 512 (fast and
reference) and a plain ResNet-50 for scale.

Time: the median of ``--repeats`` forward + backward passes after
``--warmup`` untimed ones, on one process with the default thread count.
The first two cases of a row (the baseline and the fast op) take turns,
one timed pass each per round, so that their ratio compares passes run
side by side; the reference is timed after them. Gradients are dropped
between passes.

Memory: the peak extra memory of one forward + backward.  On CPU every
case runs in a fresh child process (no allocator cache left over from other
cases): the module, input and output gradient are built, one pass runs on a
quarter-size input to initialise thread pools and kernels, then the
process's peak-RSS mark is reset (``/proc/self/clear_refs``) and the peak
resident memory reached during one full-size pass (``VmHWM``), minus the
resident memory just before it, is reported.  It counts activations kept
for the backward, temporaries, gradients and outputs; not the weights or
the input.  Without ``clear_refs`` (not Linux) memory is not reported.  On
CUDA it is ``max_memory_allocated`` minus ``memory_allocated`` before the
pass, after ``reset_peak_memory_stats``.

Usage::

    python tools/analysis/benchmark_ops.py [--quick] [--backbone]
        [--device cpu|cuda] [--repeats 5] [--warmup 2]
"""

import argparse
import contextlib
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmacmix.models import ACmix, ACmixResNet, XVolution
from mmacmix.models import acmix as acmix_module
from mmacmix.models.resnet import Bottleneck, PluggableResNet
from mmacmix.ops import local_attention, native_available

# Stage sizes of an 800 x 1216 input: strides 4, 8, 16, 32.
SHAPES = [
    (1, 64, 200, 304),
    (1, 128, 100, 152),
    (1, 256, 50, 76),
    (1, 512, 25, 38),
]
QUICK_SHAPES = SHAPES[2:]
BACKBONE_SHAPE = (1, 3, 512, 512)
OP_CASES = ('conv', 'acmix', 'reference')
ATTENTION_CASES = ('conv', 'attention', 'attention-reference')
BACKBONE_CASES = ('resnet50', 'acmix-r50', 'acmix-r50-reference')
# Both X-volution forms in eval mode, where they compute the same function
# (the deploy form folds the branch norms' running statistics).
XVOLUTION_CASES = ('conv', 'xvolution', 'xvolution-deploy')
TABLES = {
    'acmix': OP_CASES,
    'attention': ATTENTION_CASES,
    'xvolution': XVOLUTION_CASES,
}


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
    elif case == 'attention-reference':
        module = AttentionOnly(unfold_attention)
    elif case in ('acmix', 'reference'):
        module = ACmix(channels, channels, num_heads=4, attn_kernel_size=7)
    elif case in ('xvolution', 'xvolution-deploy'):
        module = XVolution(channels, channels)
        if case == 'xvolution-deploy':
            module.switch_to_deploy()
    elif case == 'resnet50':
        module = PlainResNet(depth=50)
    elif case in ('acmix-r50', 'acmix-r50-reference'):
        module = ACmixResNet(depth=50)
    else:
        raise ValueError(f'unknown case {case!r}')
    module = module.to(device).train()
    if case.startswith('xvolution'):
        module.eval()
    x = torch.randn(shape, device=device, requires_grad=True)
    if case in ('reference', 'acmix-r50-reference'):
        return module, x, reference_attention
    return module, x, contextlib.nullcontext


def forward_backward(module: nn.Module, x: Tensor) -> Tensor:
    """One training pass; returns the (first) output, detached."""
    module.zero_grad(set_to_none=True)
    x.grad = None
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
                outputs[case] = forward_backward(module, x)
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
                forward_backward(module, x)
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
    case: str, shape: tuple[int, ...], device: str
) -> float | None:
    """Peak extra MiB of one pass, in this process (see module docstring)."""
    small = (*shape[:2], *(max(1, math.ceil(s / 2)) for s in shape[2:]))
    module, x_small, context = build_case(case, small, device)
    x = torch.randn(shape, device=device, requires_grad=True)
    with context():
        forward_backward(module, x_small)
        module.zero_grad(set_to_none=True)
        del x_small
        gc.collect()
        if device.startswith('cuda'):
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            forward_backward(module, x)
            synchronize(device)
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        try:
            with open('/proc/self/clear_refs', 'w') as refs:
                refs.write('5')  # resets the peak-RSS mark to the current RSS
        except OSError:
            return None
        before = _status_kb('VmRSS')
        forward_backward(module, x)
        return (_status_kb('VmHWM') - before) / 1024


def measure_memory(
    case: str, shape: tuple[int, ...], device: str
) -> float | None:
    """Runs :func:`measure_memory_here` in a fresh child process."""
    command = [
        sys.executable,
        __file__,
        '--threads',
        str(torch.get_num_threads()),
        '--child-memory',
        json.dumps({'case': case, 'shape': shape, 'device': device}),
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
    timed = {
        case: result
        for group in (cases[:2], cases[2:])
        for case, result in time_cases(
            group, shape, args.device, args.repeats, args.warmup
        ).items()
    }
    for case, (seconds, _) in timed.items():
        row[case] = {
            'seconds': seconds,
            'mib': measure_memory(case, shape, args.device),
        }
        print(f'  {row["shape"]} {case}: {seconds * 1e3:.0f} ms', flush=True)
    fast, reference = timed[cases[1]][1], timed[cases[2]][1]
    row['max_abs_diff'] = (fast - reference).abs().max().item()
    return row


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return 'n/a'
    return f'{a / b:.1f}x'


def mib(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.0f}'


def print_table(rows: list[dict], cases: tuple[str, ...]) -> None:
    """Prints times (ms), memory (MiB) and ratios, one row per shape."""
    base, fast, reference = cases
    header = [
        'shape',
        *(f'{case} ms' for case in cases),
        f'{fast}/{base}',
        f'{reference}/{fast}',
        *(f'{case} MiB' for case in cases),
        f'mem {reference}/{fast}',
        'max|diff|',
    ]
    table = [header]
    for row in rows:
        t = [row[case]['seconds'] for case in cases]
        m = [row[case]['mib'] for case in cases]
        table.append(
            [
                row['shape'],
                *(f'{seconds * 1e3:.0f}' for seconds in t),
                ratio(t[1], t[0]),
                ratio(t[2], t[1]),
                *(mib(value) for value in m),
                ratio(m[2], m[1]),
                f'{row["max_abs_diff"]:.1e}',
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for index, line in enumerate(table):
        print(' | '.join(cell.rjust(w) for cell, w in zip(line, widths)))
        if index == 0:
            print('-+-'.join('-' * w for w in widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--quick', action='store_true', help='only the two smallest shapes'
    )
    parser.add_argument(
        '--backbone',
        action='store_true',
        help='add ACmix-ResNet-50 (fast and reference) and ResNet-50 at '
        '1x3x512x512',
    )
    parser.add_argument(
        '--threads', type=int, help='torch threads (default: torch default)'
    )
    parser.add_argument(
        '--tables',
        nargs='*',
        choices=sorted(TABLES),
        default=list(TABLES),
        help='which tables to run (default: all; none with --backbone for '
        'the backbone alone)',
    )
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--child-memory', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error('--repeats and --warmup must be >= 1')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device')
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Randomly initialised networks can hit denormals, which are very slow
    # on CPU and would time the hardware's microcode rather than the ops.
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        spec = json.loads(args.child_memory)
        value = measure_memory_here(
            spec['case'], tuple(spec['shape']), spec['device']
        )
        print(json.dumps({'mib': value}))
        return

    print(
        f'torch {torch.__version__}, device {args.device}, '
        f'{torch.get_num_threads()} threads, compiled local attention: '
        f'{native_available()}; median of {args.repeats} forward+backward '
        f'after {args.warmup} warm-up',
        flush=True,
    )
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for cases in (TABLES[name] for name in args.tables):
        rows = [run_shape(shape, cases, args) for shape in shapes]
        print()
        print_table(rows, cases)
        print()
    if args.backbone:
        backbone = [run_shape(BACKBONE_SHAPE, BACKBONE_CASES, args)]
        print()
        print_table(backbone, BACKBONE_CASES)


if __name__ == '__main__':
    main()
