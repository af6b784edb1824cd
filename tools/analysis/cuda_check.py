"""The GPU check: one process per phase, each within a time budget.

``tools/analysis/cuda_check.sh`` runs this script (see there for the whole
procedure). Two phases, each one process that stops itself before its
budget runs out, so that a lent GPU's time is never wasted:

* ``ops``: the preflight (imports, versions, the device, one tiny call of
  each Triton op against its PyTorch implementation), which stops the run
  within seconds if anything is missing; the CUDA tests (pytest, in this
  process, without xdist); the SDPA backends that ACmix-Swin's window
  attention gets; then the op tables: the ACmix op and the attention alone
  against a 3x3 conv (and the unfold reference), SAN's patch aggregation
  against a 3x3 conv (and its PyTorch loop), in float32 and in float16
  (half tensors: autocast does not cast custom ops), and X-volution in
  float32;
* ``backbones``: whole backbones in float32 and under float16 autocast:
  ACmix-ResNet-50 (and its unfold reference) against a plain ResNet-50,
  ACmix-Swin-T against torchvision's Swin-T, ACmix-SAN-10 against the
  patchwise SAN-10, and ACmix-PVT-T alone (its baseline, mmdet's PVT-T,
  needs mmdet, which the GPU machine lacks).

Time is the median of ``--repeats`` forward + backward passes timed in
turns after warm-up (benchmark_ops.py's ``time_in_turns``); memory is the
peak extra CUDA memory of one pass, through
``torch.cuda.reset_peak_memory_stats`` in this process (none on the CPU).
Every part adds its result to ``OUT_DIR/cuda_check.json`` as soon as it is
done and rewrites ``OUT_DIR/cuda_check.md`` (markdown tables) from it; a
part that fails is recorded with its error and the next one runs. mmdet,
mmseg and mmpretrain are blocked from import in every mode.

``--dry-run`` runs the same code on the CPU with the smallest shapes, one
pass and no warm-up, and small variants of the backbones (the same classes,
one block a stage, narrow; :func:`dry_backbone`), for CI.
``--check-wheels DIR`` checks a wheel folder made by
``tools/analysis/cuda_wheels.sh`` instead (see there).

Usage::

    python tools/analysis/cuda_check.py --phase ops|backbones [--dry-run]
        [--budget-s S] [--repeats N] OUT_DIR
    python tools/analysis/cuda_check.py --check-wheels DIR
"""

import argparse
import ast
import contextlib
import gc
import importlib.abc
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# What the GPU machine lacks; imported nowhere in this check.
BLOCKED = ('mmdet', 'mmseg', 'mmpretrain')
PHASES = ('ops', 'backbones')
CUDA_TESTS = [
    'tests/test_ops/test_local_attention_triton.py',
    'tests/test_ops/test_patch_aggregation_triton.py',
    'tests/test_ops/test_local_attention.py',
    'tests/test_ops/test_autocast.py',
]
# Op tables: (table, dtype). X-volution's deployed form is timed in
# float32 only.
OP_TABLES = [
    ('acmix', 'float32'),
    ('attention', 'float32'),
    ('san-aggregation', 'float32'),
    ('acmix', 'float16'),
    ('attention', 'float16'),
    ('san-aggregation', 'float16'),
    ('xvolution', 'float32'),
]
BACKBONE_CASES = {
    'resnet': ('resnet50', 'acmix-r50', 'acmix-r50-reference'),
    'swin': ('swin-t', 'acmix-swin-t'),
    'san': ('san10', 'acmix-san10'),
    # mmdet's PVT-T is the baseline; without mmdet ACmix-PVT-T runs alone.
    'pvt': ('acmix-pvt-t',),
}
DRY_OP_SHAPES = [(1, 16, 9, 12)]
# The smallest input whose stride-32 map (4x4) the unfold reference can
# reflect-pad by 3.
DRY_BACKBONE_SHAPE = (1, 3, 128, 128)


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses to import the packages the GPU machine does not have."""

    def find_spec(self, name, path, target=None):
        root = name.partition('.')[0]
        if root in BLOCKED:
            raise ModuleNotFoundError(
                f'{name} is blocked: the GPU check must run without {root}',
                name=name,
            )
        return None


def block_imports() -> None:
    if not any(isinstance(f, _Blocker) for f in sys.meta_path):
        sys.meta_path.insert(0, _Blocker())


class Report:
    """The JSON result of every part, rewritten (atomically) after each,
    with the markdown tables made from it."""

    def __init__(self, out_dir: str) -> None:
        self.json_path = osp.join(out_dir, 'cuda_check.json')
        self.md_path = osp.join(out_dir, 'cuda_check.md')
        self.data: dict = {}
        if osp.exists(self.json_path):
            with open(self.json_path) as file:
                self.data = json.load(file)

    def set(self, phase: str, part: str, value) -> None:
        self.data.setdefault(phase, {})[part] = value
        self.write()

    def write(self) -> None:
        from mmacmix.fileio import atomic_path

        with atomic_path(self.json_path) as partial:
            with open(partial, 'w') as file:
                json.dump(self.data, file, indent=1)
        with atomic_path(self.md_path) as partial:
            with open(partial, 'w') as file:
                file.write(markdown(self.data))


def markdown(data: dict) -> str:
    """Markdown of the environment, the tests and every table."""
    lines = ['# GPU check', '']
    for phase in PHASES:
        parts = data.get(phase, {})
        env = parts.get('preflight', {}).get('environment')
        if env:
            described = ', '.join(f'{k} {v}' for k, v in env.items())
            lines += [f'Environment ({phase}): {described}', '']
        for part, value in parts.items():
            if part == 'preflight':
                continue
            lines.append(f'## {phase}: {part}')
            lines.append('')
            if isinstance(value, dict) and 'rows' in value:
                lines += table_markdown(value)
            else:
                lines += ['```', json.dumps(value, indent=1), '```']
            lines.append('')
    return '\n'.join(lines) + '\n'


def table_markdown(table: dict) -> list[str]:
    """One row per shape: each case's ms and MiB, and its ratio to the
    first case (the baseline)."""
    cases = table['cases']
    base = cases[0]
    header = ['shape']
    header += [f'{c} ms' for c in cases]
    header += [f'{c}/{base}' for c in cases[1:]]
    header += [f'{c} MiB' for c in cases]
    header += ['max abs diff']
    lines = [
        f'{table.get("note", "")}'.strip(),
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '---|' * len(header),
    ]
    for row in table['rows']:
        if 'skipped' in row or 'error' in row:
            reason = row.get('skipped') or row.get('error')
            lines.append(f'| {row["shape"]} | {reason} |')
            continue
        ms = [row['cases'].get(c, {}).get('ms') for c in cases]
        mib = [row['cases'].get(c, {}).get('mib') for c in cases]
        cells = [row['shape']]
        cells += [fmt(v, '.2f') for v in ms]
        cells += [
            'n/a' if v is None or not ms[0] else f'{v / ms[0]:.2f}x'
            for v in ms[1:]
        ]
        cells += [fmt(v, '.0f') for v in mib]
        cells.append(fmt(row.get('max_abs_diff'), '.1e'))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def fmt(value, spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


class Budget:
    """Seconds left of the phase; parts and rows check it before they
    start and are recorded as skipped when it has run out."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0


def versions() -> dict:
    import numpy
    import torch

    env = {
        'python': platform.python_version(),
        'torch': torch.__version__,
        'numpy': numpy.__version__,
    }
    for name in ('triton', 'mmengine', 'mmcv', 'pytest', 'torchvision'):
        try:
            env[name] = __import__(name).__version__
        except ImportError as error:
            raise RuntimeError(f'{name} cannot be imported: {error}') from None
    if torch.cuda.is_available():
        env['device'] = torch.cuda.get_device_name()
        env['capability'] = '.'.join(
            map(str, torch.cuda.get_device_capability())
        )
    else:
        env['device'] = f'cpu ({platform.processor() or platform.machine()})'
    env['threads'] = torch.get_num_threads()
    return env


def preflight(device: str) -> dict:
    """Checks imports, versions, the device and one call of each Triton op.

    Raises:
        RuntimeError: With the first thing that is missing or wrong.
    """
    import torch

    env = versions()
    if device == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(
            'no CUDA device: torch.cuda.is_available() is False'
        )
    import mmacmix.models  # noqa: F401  (mmengine, mmcv.cnn, registries)
    from mmacmix.ops import local_attention, patch_aggregation
    from mmacmix.ops.local_attention import triton_available

    impl = 'triton' if device == 'cuda' else 'auto'
    if device == 'cuda' and not triton_available('cuda'):
        raise RuntimeError('the Triton kernels cannot run: triton missing')
    # One tiny call of each op, forward + backward, against its PyTorch loop.
    errors = {}
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 16, 9, 11, generator=generator).to(device)
        for _ in range(3)
    )
    weights = torch.randn(1, 4, 49, 9, 11, generator=generator).to(device)
    calls = {
        'local_attention': lambda i, x: local_attention(*x, 7, 1, impl=i),
        'patch_aggregation': lambda i, x: patch_aggregation(
            x[0][:1], weights, 7, impl=i
        ),
    }
    for name, call in calls.items():
        results = []
        for which in (impl, 'pytorch'):
            inputs = [x.clone().requires_grad_() for x in (q, k, v)]
            out = call(which, inputs)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), inputs[0].grad])
        errors[name] = max(
            (a - b).abs().max().item() for a, b in zip(*results)
        )
        if not errors[name] < 1e-3:
            raise RuntimeError(
                f'{name} with impl={impl!r} differs from the PyTorch loop '
                f'by {errors[name]:.3g}'
            )
    return {'environment': env, 'smoke_max_abs_diff': errors, 'impl': impl}


def run_tests(out_dir: str) -> dict:
    """The CUDA tests, through pytest in this process (no xdist)."""
    import pytest

    xml = osp.join(out_dir, 'tests.xml')
    args = [
        *(osp.join(REPO, path) for path in CUDA_TESTS),
        '-p',
        'no:xdist',
        '-p',
        'no:cacheprovider',
        '-o',
        'addopts=',
        '-q',
        '-rs',
        '-k',
        'cuda',
        f'--junitxml={xml}',
    ]
    start = time.monotonic()
    code = int(pytest.main(args))
    counts = junit_counts(xml)
    result = {'exit_code': code, 'seconds': time.monotonic() - start}
    result.update(counts)
    # On the CPU (dry run) they skip, but pytest must collect them; the
    # skips on a GPU are in the counts (and their reasons in the log).
    result['ok'] = code == 0 and counts.get('tests', 0) > 0
    return result


def junit_counts(path: str) -> dict:
    import xml.etree.ElementTree as ET

    if not osp.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    return {
        key: int(suite.get(key, 0))
        for key in ('tests', 'failures', 'errors', 'skipped')
    }


def sdpa_backends(device: str, dry_run: bool) -> dict:
    """Which SDPA backends run ACmix-Swin-T's window attention (4-d inputs
    and an additive bias), forward + backward under float16 autocast."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mmacmix.models import ACmixSwinTransformer

    arch = 'tiny'
    if dry_run:
        arch = dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2))
    model = ACmixSwinTransformer(
        arch=arch, out_indices=(0, 1) if dry_run else (0, 1, 2, 3)
    ).to(device)
    shape = (1, 3, 32, 32) if dry_run else (2, 3, 800, 1216)
    x = torch.randn(shape, device=device)
    dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    result = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        model.zero_grad(set_to_none=True)
        try:
            with sdpa_kernel([backend]), torch.autocast(device, dtype):
                outs = model(x)
            sum(o.float().sum() for o in outs).backward()
            result[backend.name] = 'runs'
        except RuntimeError as error:
            result[backend.name] = (
                f'refused ({str(error).strip().splitlines()[0][:200]})'
            )
    return result


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_peak_mib(run, device: str) -> float | None:
    """Peak extra CUDA memory (MiB) of one call of ``run``."""
    import torch

    if device != 'cuda':
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def timed_row(
    cases: tuple[str, ...],
    shape: tuple[int, ...],
    device: str,
    dtype: str,
    autocast: bool,
    repeats: int,
    warmup: int,
    build=None,
) -> dict:
    """Times and peak memory of benchmark_ops.py's cases at one shape.

    The first two cases (baseline and ACmix) take turns; a third (the
    unfold reference, slow and large) is timed apart after them, so that it
    does not flush the caches between their passes. With ``autocast`` the
    forward runs under ``torch.autocast(dtype)``; otherwise the modules and
    the input are cast to ``dtype`` (half tensors reach the custom ops).
    """
    import benchmark_ops as bench
    import torch

    torch_dtype = getattr(torch, dtype)
    cast = None if autocast else torch_dtype
    autocast_dtype = torch_dtype if autocast else None
    row: dict = {'shape': 'x'.join(map(str, shape)), 'cases': {}}
    outputs = {}

    def make_pass(case, module, x, context):
        def run():
            with context():
                outputs[case] = bench.forward_backward(
                    module, x, autocast_dtype
                )

        return run

    for group in (cases[:2], cases[2:]):
        if not group:
            continue
        passes = {}
        for case in group:
            module, x, context = (build or bench.build_case)(
                case, shape, device
            )
            if cast is not None and cast != torch.float32:
                module = module.to(cast)
                x = x.detach().to(cast).requires_grad_()
            passes[case] = make_pass(case, module, x, context)
        times = bench.time_in_turns(passes, device, repeats, warmup)
        for case in group:
            row['cases'][case] = {
                'ms': times[case] * 1e3,
                'mib': cuda_peak_mib(passes[case], device),
            }
            outputs[case] = outputs[case].float().cpu()
        del passes, module, x
        free_memory()
    if len(cases) == 3:
        diff = (outputs[cases[1]] - outputs[cases[2]]).abs().max().item()
        row['max_abs_diff'] = diff
    return row


def op_table(name: str, dtype: str, shapes, args, budget: Budget) -> dict:
    """One op table: rows of every shape (skipped once over budget)."""
    import benchmark_ops as bench
    import torch

    device = 'cpu' if args.dry_run else 'cuda'
    table: dict = {'dtype': dtype, 'rows': []}
    if name == 'xvolution':
        table['cases'] = [
            f'{case} {kind}' for case, kind in bench.XVOLUTION_CASES
        ]
    else:
        table['cases'] = list(bench.TABLES[name])
    if dtype != 'float32':
        table['note'] = f'{dtype} tensors (no autocast)'
    namespace = argparse.Namespace(
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        autocast='none' if dtype == 'float32' else dtype,
    )
    for shape in shapes:
        label = 'x'.join(map(str, shape))
        if budget.exhausted():
            table['rows'].append({'shape': label, 'skipped': 'time budget'})
            continue
        try:
            if name == 'san-aggregation':
                row = bench.san_aggregation_row(shape, namespace)
                row = {
                    'shape': label,
                    'cases': {
                        case: {
                            'ms': row[case]['seconds'] * 1e3,
                            'mib': row[case]['mib'],
                        }
                        for case in table['cases']
                        if case in row
                    },
                    'max_abs_diff': row.get('max_abs_diff'),
                }
            elif name == 'xvolution':
                row = bench.xvolution_row(shape, namespace)
                row = {
                    'shape': label,
                    'cases': {
                        f'{case} {kind}': {'ms': seconds * 1e3, 'mib': None}
                        for (case, kind), seconds in row['times'].items()
                    },
                    'max_abs_diff': row['max_abs_diff'],
                }
            else:
                row = timed_row(
                    bench.TABLES[name],
                    shape,
                    device,
                    dtype,
                    False,
                    args.repeats,
                    args.warmup,
                )
        except Exception as error:  # recorded; the next row still runs
            row = {'shape': label, 'error': one_line(error)}
        table['rows'].append(row)
        free_memory()
        torch.manual_seed(0)
    return table


def dry_backbone(case: str, shape: tuple[int, ...], device: str):
    """A small variant of a backbone case of benchmark_ops.py (same class,
    a block a stage, narrow), for the dry run: the check's code path at a
    fraction of the cost of the real networks."""
    import benchmark_ops as bench
    import torch
    from torchvision.models.swin_transformer import SwinTransformer

    from mmacmix.models import (
        ACmixPVT,
        ACmixResNet,
        ACmixSAN,
        ACmixSwinTransformer,
    )
    from mmacmix.models.resnet import Bottleneck

    class TinyResNet(bench.PlainResNet):
        arch_settings = {14: (Bottleneck, (1, 1, 1, 1))}

    class TinyACmixResNet(ACmixResNet):
        arch_settings = {14: (Bottleneck, (1, 1, 1, 1))}

    san = dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 7, 7, 7, 7))
    builders = {
        'resnet50': lambda: TinyResNet(depth=14),
        'acmix-r50': lambda: TinyACmixResNet(depth=14),
        'acmix-r50-reference': lambda: TinyACmixResNet(depth=14),
        'swin-t': lambda: (
            SwinTransformer([4, 4], 16, [1, 1], [1, 2], [7, 7]).features
        ),
        'acmix-swin-t': lambda: ACmixSwinTransformer(
            arch=dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2)),
            out_indices=(0, 1),
        ),
        'san10': lambda: ACmixSAN(arch=san, with_acmix=False),
        'acmix-san10': lambda: ACmixSAN(arch=san),
        'acmix-pvt-t': lambda: ACmixPVT(
            arch=dict(
                embed_dims=(8, 16, 40, 64),
                depths=(1, 1, 1, 1),
                num_heads=(1, 2, 5, 8),
            )
        ),
    }
    torch.manual_seed(0)
    module = builders[case]().to(device).train()
    x = torch.randn(shape, device=device, requires_grad=True)
    if case.endswith('-reference'):
        return module, x, bench.reference_attention
    return module, x, contextlib.nullcontext


def backbone_table(name: str, dtype: str, args, budget: Budget) -> dict:
    cases = BACKBONE_CASES[name]
    device = 'cpu' if args.dry_run else 'cuda'
    shape = DRY_BACKBONE_SHAPE if args.dry_run else (2, 3, 800, 1216)
    autocast = dtype != 'float32'
    table: dict = {'dtype': dtype, 'cases': list(cases), 'rows': []}
    if autocast:
        table['note'] = f'forward under torch.autocast({dtype})'
    if name == 'pvt':
        table['note'] = (
            table.get('note', '') + " no baseline: mmdet's PVT-T needs mmdet"
        ).strip()
    label = 'x'.join(map(str, shape))
    if budget.exhausted():
        table['rows'].append({'shape': label, 'skipped': 'time budget'})
        return table
    try:
        table['rows'].append(
            timed_row(
                cases,
                shape,
                device,
                dtype,
                autocast,
                args.repeats,
                args.warmup,
                dry_backbone if args.dry_run else None,
            )
        )
    except Exception as error:
        table['rows'].append({'shape': label, 'error': one_line(error)})
    free_memory()
    return table


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


def run_phase(args) -> int:
    """Runs one phase; returns the exit status (0: every part passed)."""
    report = Report(args.out_dir)
    phase = args.phase
    device = 'cpu' if args.dry_run else 'cuda'
    budget = Budget(args.budget_s)
    report.data[phase] = {}
    try:
        report.set(phase, 'preflight', preflight(device))
    except Exception as error:
        report.set(phase, 'preflight', {'error': one_line(error)})
        print(f'preflight failed: {one_line(error)}', file=sys.stderr)
        return 2
    print(json.dumps(report.data[phase]['preflight']), flush=True)
    status = 0
    if phase == 'ops':
        parts = [('tests', lambda: run_tests(args.out_dir))]
        parts.append(
            ('sdpa_backends', lambda: sdpa_backends(device, args.dry_run))
        )
        import benchmark_ops

        shapes = DRY_OP_SHAPES
        if not args.dry_run:
            shapes = [(2, *stage) for stage in benchmark_ops.STAGES]
        for name, dtype in OP_TABLES:
            parts.append(
                (
                    f'{name}_{dtype}',
                    lambda n=name, d=dtype: op_table(
                        n, d, shapes, args, budget
                    ),
                )
            )
    else:
        parts = [
            (
                f'backbone_{name}_{dtype}',
                lambda n=name, d=dtype: backbone_table(n, d, args, budget),
            )
            for dtype in ('float32', 'float16')
            for name in BACKBONE_CASES
        ]
    for part, run in parts:
        if budget.exhausted():
            report.set(phase, part, {'skipped': 'time budget'})
            print(f'== {part}: skipped (time budget)', flush=True)
            continue
        print(f'== {part} ({budget.left():.0f} s left)', flush=True)
        start = time.monotonic()
        try:
            value = run()
        except Exception as error:
            traceback.print_exc()
            value = {'error': one_line(error)}
        if isinstance(value, dict):
            value.setdefault('seconds', time.monotonic() - start)
        failed = (
            'error' in value
            or value.get('ok') is False
            or any('error' in row for row in value.get('rows', []))
        )
        status = status or int(failed)
        report.set(phase, part, value)
    return status


# The GPU machine's own packages (gpu.md), by distribution and by the
# modules they and their dependencies import; everything else that the
# check imports must come from the wheel folder.
PROVIDED = {
    'torch',
    'torchvision',
    'triton',
    'numpy',
    'pytest',
    'hypothesis',
    'onnx',
    'onnxruntime',
    'opencv-python-headless',
    'matplotlib',
    'pillow',
    'packaging',
}
# mmengine asks for opencv-python; the headless build provides cv2 alike.
ALIASES = {'opencv-python': 'opencv-python-headless'}
PROVIDED_MODULES = {
    'torch',
    'torchvision',
    'triton',
    'numpy',
    'pytest',
    '_pytest',
    'pluggy',
    'iniconfig',
    'hypothesis',
    'sortedcontainers',
    'attr',
    'attrs',
    'onnx',
    'onnxruntime',
    'cv2',
    'matplotlib',
    'mpl_toolkits',
    'PIL',
    'packaging',
    'sympy',
    'mpmath',
    'networkx',
    'jinja2',
    'markupsafe',
    'filelock',
    'fsspec',
    'typing_extensions',
    'setuptools',
    'pkg_resources',
    '_distutils_hack',
    'kiwisolver',
    'cycler',
    'pyparsing',
    'dateutil',
    'fontTools',
    'contourpy',
    'six',
    'google',
    'protobuf',
    # Shipped inside the torch wheel.
    'torchgen',
    # Optional: torch.hub imports it inside a try and falls back without.
    'tqdm',
}
TARGET_PYTHON = (3, 12)
# glibc of the manylinux tags accepted (torch 2.11's own wheels need 2.28).
MAX_GLIBC_MINOR = 28
# What the child of --check-wheels imports and builds, from the folder.
IMPORT_CHECK = """
import sys
sys.path[:0] = [DEPS, REPO, TOOLS]
sys.path += SITE
import cuda_check
cuda_check.block_imports()
import yaml, addict, yapf, termcolor, rich, mmengine, mmcv, mmcv.cnn
import mmacmix.models, benchmark_ops
from mmacmix.models import ACmixResNet, ACmixSAN
ACmixResNet(depth=26)
ACmixSAN(arch=10)
from mmengine.config import Config
Config(dict(model=dict(type='ACmixResNet')))
files = {}
for name, module in list(sys.modules.items()):
    path = getattr(module, '__file__', None)
    if path and '.' not in name:
        files[name] = path
print(repr(files))
"""


def supported_tags() -> set:
    """Wheel tags that CPython 3.12 on x86-64 Linux installs."""
    from packaging import tags

    platforms = ['manylinux2014_x86_64', 'linux_x86_64']
    platforms += [
        f'manylinux_2_{minor}_x86_64'
        for minor in range(MAX_GLIBC_MINOR, 4, -1)
    ]
    return set(
        tags.cpython_tags(TARGET_PYTHON, abis=['cp312'], platforms=platforms)
    ) | set(tags.compatible_tags(TARGET_PYTHON, 'cp312', platforms=platforms))


def wheel_metadata(path: str):
    from email.parser import HeaderParser

    with zipfile.ZipFile(path) as wheel:
        name = next(
            n
            for n in wheel.namelist()
            if n.count('/') == 1 and n.endswith('.dist-info/METADATA')
        )
        return HeaderParser().parsestr(wheel.read(name).decode())


def check_wheels(folder: str) -> int:
    """Checks that ``folder`` holds every wheel the GPU check needs.

    Three checks, each naming what fails: every wheel installs on CPython
    3.12 (x86-64 Linux); every requirement of every wheel (markers
    evaluated for Python 3.12 on Linux) is met by a wheel of the folder or
    by the GPU machine's own packages (``PROVIDED``); and a clean
    interpreter (``-I -S``: no PYTHONPATH, no user site, no .pth hooks)
    with the unpacked folder and the checkout first on its path, this
    interpreter's site-packages last, imports mmengine, mmcv.cnn, the models
    and benchmark_ops, builds two backbones and a config, and loaded every
    module it needed from the folder, the checkout, the standard library or
    the packages the GPU machine has (``PROVIDED_MODULES``).

    The interpreter here may not be 3.12: then the folder's compiled
    modules are not loaded here (PyYAML falls back to its pure-Python
    code); their tags are checked instead.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    wheels = sorted(
        osp.join(folder, n) for n in os.listdir(folder) if n.endswith('.whl')
    )
    problems = []
    if not wheels:
        problems.append(f'no wheels in {folder}')
    supported = supported_tags()
    present = {}
    for path in wheels:
        name, version, _, wheel_tags = parse_wheel_filename(osp.basename(path))
        present[name] = version
        if not wheel_tags & supported:
            problems.append(
                f'{osp.basename(path)} does not install on CPython 3.12 '
                'x86-64 Linux'
            )
    environment = {
        'python_version': '.'.join(map(str, TARGET_PYTHON)),
        'python_full_version': '.'.join(map(str, TARGET_PYTHON)) + '.0',
        'sys_platform': 'linux',
        'platform_system': 'Linux',
        'platform_machine': 'x86_64',
        'os_name': 'posix',
        'implementation_name': 'cpython',
        'platform_python_implementation': 'CPython',
        'extra': '',
    }
    for path in wheels:
        metadata = wheel_metadata(path)
        for line in metadata.get_all('Requires-Dist') or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(
                environment
            ):
                continue
            name = canonicalize_name(requirement.name)
            name = ALIASES.get(name, name)
            if name in PROVIDED:
                continue
            if name not in present:
                problems.append(
                    f'{osp.basename(path)} needs {line}: not in the folder'
                )
            elif not requirement.specifier.contains(
                str(present[name]), prereleases=True
            ):
                problems.append(
                    f'{osp.basename(path)} needs {line}, the folder has '
                    f'{present[name]}'
                )
    if not problems:
        problems += import_check(wheels)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(
        f'{len(wheels)} wheels in {folder} complete for Python 3.12: '
        + ', '.join(f'{n} {v}' for n, v in sorted(present.items()))
    )
    return 0


def import_check(wheels: list[str]) -> list[str]:
    """Imports from the unpacked wheels in a clean interpreter; returns
    the modules that came from anywhere else not allowed."""
    import site
    import sysconfig

    stdlib = {
        osp.realpath(sysconfig.get_paths()[key])
        for key in ('stdlib', 'platstdlib')
    }
    with tempfile.TemporaryDirectory() as deps:
        for path in wheels:
            with zipfile.ZipFile(path) as wheel:
                wheel.extractall(deps)
        code = IMPORT_CHECK.replace('DEPS', repr(deps))
        code = code.replace('REPO', repr(REPO))
        code = code.replace('SITE', repr(site.getsitepackages()))
        code = code.replace('TOOLS', repr(osp.dirname(osp.abspath(__file__))))
        # -I: no PYTHONPATH, no user site; -S: no site-packages nor their
        # .pth hooks (an editable mmacmix): the code appends them.
        result = subprocess.run(
            [sys.executable, '-I', '-S', '-c', code],
            capture_output=True,
            text=True,
            cwd=deps,
        )
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:]
            return [f'the import check failed: {" ".join(tail)}']
        files = ast.literal_eval(result.stdout.strip().splitlines()[-1])
        deps_real = osp.realpath(deps)

    def allowed(path: str) -> bool:
        real = osp.realpath(path)
        if real.startswith((deps_real + os.sep, osp.realpath(REPO) + os.sep)):
            return True
        return 'site-packages' not in real and any(
            real.startswith(p + os.sep) for p in stdlib
        )

    return [
        f'{name} came from {path}: neither in the folder nor on the GPU '
        'machine'
        for name, path in sorted(files.items())
        if not allowed(path) and name not in PROVIDED_MODULES
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', nargs='?', help='folder of the results')
    parser.add_argument('--phase', choices=PHASES)
    parser.add_argument(
        '--dry-run',
        action='store_true',
        help='CPU, smallest shapes, one pass: the code path for CI',
    )
    parser.add_argument(
        '--budget-s',
        type=float,
        default=240.0,
        help='seconds this phase may take before it skips what is left '
        '(default 240: a 5-minute call with time to start and copy back)',
    )
    parser.add_argument('--repeats', type=int, help='timed passes (10; 1 dry)')
    parser.add_argument(
        '--warmup', type=int, help='untimed passes first (2; 0 dry)'
    )
    parser.add_argument(
        '--check-wheels',
        metavar='DIR',
        help='check a wheel folder for Python 3.12 instead of running',
    )
    args = parser.parse_args(argv)
    if args.check_wheels:
        return args
    if not args.out_dir or not args.phase:
        parser.error('OUT_DIR and --phase are required')
    if args.repeats is None:
        args.repeats = 1 if args.dry_run else 10
    if args.warmup is None:
        args.warmup = 0 if args.dry_run else 2
    if args.repeats < 1 or args.warmup < 0 or args.budget_s <= 0:
        parser.error(
            '--repeats and --budget-s must be positive, --warmup not negative'
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_wheels:
        return check_wheels(args.check_wheels)
    block_imports()
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # benchmark_ops
    os.makedirs(args.out_dir, exist_ok=True)
    import torch

    torch.set_flush_denormal(True)
    return run_phase(args)


if __name__ == '__main__':
    sys.exit(main())
