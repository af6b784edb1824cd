"""Peak training memory of the backbones with and without ``with_cp``.

Usage: python tools/analysis/benchmark_memory.py [--models M ...]
[--size H W] [--batch B] [--runs N] [--json FILE]

Each measurement runs in a fresh child process: it builds the backbone in
training mode, then runs one forward and backward pass (the loss is the sum
of the means of all outputs) and reports how far its resident set rose above
what it held just before the forward pass (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus ``VmRSS``). The child sets glibc's
mmap threshold so that freed tensors go back to the system instead of
staying in the heap, which would hide a later peak. Medians of ``--runs``
children are printed with the ratio ``with_cp / without``; a second table
gives the median wall time of the passes (checkpointing recomputes every
block in the backward pass, so it is slower).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = {
    'acmix-r50': dict(type='mmacmix.ACmixResNet', depth=50),
    'acmix-swin-t': dict(
        type='mmacmix.ACmixSwinTransformer', arch='tiny', drop_path_rate=0.0
    ),
    'xvolution-r50': dict(type='mmacmix.XVolutionResNet', depth=50),
}
# Below this size glibc serves allocations from its heap, which keeps freed
# blocks; above it every block is its own mapping, unmapped when freed. A
# fixed value also stops glibc from raising the threshold as it sees frees.
MMAP_THRESHOLD = 1 << 16


def _status_kib(field: str) -> int:
    with open('/proc/self/status') as file:
        for line in file:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


def _reset_peak() -> None:
    # Writing 5 resets the peak resident set (VmHWM) to the current one.
    with open('/proc/self/clear_refs', 'w') as file:
        file.write('5')


def measure(name: str, with_cp: bool, size: tuple, batch: int) -> dict:
    """One forward and backward pass in this process; call in a child."""
    import gc

    import torch

    import mmacmix.models  # noqa: F401  (registers the backbones)
    from mmacmix.registry import MODELS as REGISTRY

    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    model = REGISTRY.build(dict(MODELS[name], with_cp=with_cp)).train()
    images = torch.randn(batch, 3, *size)
    gc.collect()
    _reset_peak()
    before = _status_kib('VmRSS')
    start = time.perf_counter()
    outs = model(images)
    loss = sum(out.mean() for out in outs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_kib('VmHWM')
    return dict(
        model=name,
        with_cp=with_cp,
        peak_mib=(peak - before) / 1024,
        seconds=seconds,
        params=sum(p.numel() for p in model.parameters()),
    )


def run_child(name: str, with_cp: bool, size: tuple, batch: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    command = [
        sys.executable,
        __file__,
        '--child',
        name,
        str(int(with_cp)),
        *map(str, size),
        str(batch),
    ]
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(
            f'{name} (with_cp={with_cp}) failed:\n{result.stderr[-2000:]}'
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0].strip()
    )
    parser.add_argument(
        '--models', nargs='+', choices=sorted(MODELS), default=sorted(MODELS)
    )
    parser.add_argument(
        '--size', nargs=2, type=int, default=(512, 512), metavar=('H', 'W')
    )
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--child', nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, with_cp, height, width, batch = args.child
        result = measure(
            name, bool(int(with_cp)), (int(height), int(width)), int(batch)
        )
        print(json.dumps(result))
        return

    size = tuple(args.size)
    rows = []
    for name in args.models:
        runs = {False: [], True: []}
        # Alternate the two settings so that a change of machine load
        # during the benchmark hits both alike.
        for _ in range(args.runs):
            for with_cp in (False, True):
                result = run_child(name, with_cp, size, args.batch)
                runs[with_cp].append(result)
        summary = {}
        for with_cp, results in runs.items():
            summary[with_cp] = dict(
                peak_mib=statistics.median(r['peak_mib'] for r in results),
                seconds=statistics.median(r['seconds'] for r in results),
                peaks=[round(r['peak_mib']) for r in results],
            )
        rows.append(
            dict(
                model=name,
                input=f'{args.batch}x3x{size[0]}x{size[1]}',
                runs=args.runs,
                without_cp=summary[False],
                with_cp=summary[True],
                memory_ratio=summary[True]['peak_mib']
                / summary[False]['peak_mib'],
                time_ratio=summary[True]['seconds']
                / summary[False]['seconds'],
            )
        )
        print_row(rows[-1])
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(rows, file, indent=2)


def print_row(row: dict) -> None:
    off, on = row['without_cp'], row['with_cp']
    print(
        f'{row["model"]:14s} {row["input"]}: peak fwd+bwd memory '
        f'{off["peak_mib"]:.0f} MiB -> {on["peak_mib"]:.0f} MiB with '
        f'with_cp (x{row["memory_ratio"]:.2f}); time {off["seconds"]:.1f} s '
        f'-> {on["seconds"]:.1f} s (x{row["time_ratio"]:.2f}); medians of '
        f'{row["runs"]} runs, peaks {off["peaks"]} / {on["peaks"]} MiB',
        flush=True,
    )


if __name__ == '__main__':
    main()
