"""Static gates of the Triton kernels, compiled for Hopper without a GPU.

Every launch the local attention makes (forward and backward, every
autotune configuration its pruning keeps) is compiled by Triton's own
compiler for sm_90a (triton_gates.py), for every dtype, both strides, the
head widths of ACmix and the integer specialisations Triton makes at run
time, and must stay within a stated budget:

* no register spills and no stack frame;
* at most 168 registers per thread for head widths that are multiples of
  16 (every ACmix width), so that 12 warps fit on a Hopper SM (65536
  registers), and at most 192 (10 warps) for other widths;
* no shared memory (no cross-warp reduction, no layout conversion through
  shared memory);
* one head's channels inside a warp: every 2-d layout (channels by pixels)
  puts its warps on the pixels only;
* the reflection's integer divisions and remainders outside every loop, as
  many for a 3x3 window as for a 7x7 one.

Maps with sizes of 1 or multiples of 16, which Triton would specialise,
launch the same kernels as any other map (the kernels opt out of
specialising the map's sizes); the head width's specialisations (1,
multiples of 16, others) and misaligned views are compiled too.
"""

import pytest
import torch

triton = pytest.importorskip('triton')

import triton.language as tl  # noqa: E402
from triton_gates import (  # noqa: E402
    Compiled,
    Launch,
    budget_violations,
    compile_launch,
    describe,
    record_launches,
)

from mmacmix.ops import local_attention_triton as kernels  # noqa: E402

pytestmark = pytest.mark.skipif(
    kernels.INTERPRETED, reason='this process runs under TRITON_INTERPRET=1'
)

REGISTERS = 168  # head widths that are multiples of 16
REGISTERS_ANY_WIDTH = 192
SHARED_BYTES = 0
KERNELS = ('forward_kernel', 'backward_q_kernel', 'backward_kv_kernel')
DTYPES = {
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float64': torch.float64,
}


def op_launches(d, h, w, stride, dtype, kernel_size=7, n=2, offset=0):
    """Every launch of one forward and backward of the op, per config;
    ``offset`` elements before each tensor's start (misaligned views)."""
    ho, wo = -(-h // stride), -(-w // stride)

    def tensor(*shape, dtype=dtype):
        size = torch.Size(shape).numel()
        return torch.zeros(size + offset, dtype=dtype)[offset:].view(shape)

    q, k = tensor(n, d, ho, wo), tensor(n, d, h, w)
    lse = tensor(n, ho, wo, dtype=kernels._accumulator_dtype(dtype))

    def run():
        kernels.forward(q, k, k, kernel_size, stride)
        kernels.backward(q, q, k, k, lse, kernel_size, stride)

    launches = record_launches(kernels, KERNELS, run)
    names = {launch.name for launch in launches}
    assert names == {f'_{name}' for name in KERNELS}
    return launches


def assert_within_budget(
    compiled: Compiled, registers: int = REGISTERS
) -> None:
    violations = budget_violations(
        compiled, registers=registers, shared_bytes=SHARED_BYTES
    )
    assert not violations, violations
    # Warps on the pixels only: one head's channels inside a warp.
    layouts = [w for w in compiled.warps_per_cta() if len(w) == 2]
    assert layouts, compiled.specialisation
    channels = kernels.CHANNEL_AXIS
    assert all(w[channels] == 1 for w in layouts), (compiled.name, layouts)
    # The k/v gradients' atomic adds need no ordering: relaxed, no fences.
    atomics = compiled.atomics()
    assert bool(atomics) == (compiled.name == '_backward_kv_kernel')
    assert all('.relaxed.' in op for op in atomics), atomics


@pytest.mark.parametrize('head_width', [16, 32, 64, 128])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dtype', list(DTYPES))
def test_every_launch_within_budget(dtype, stride, head_width):
    launches = op_launches(head_width, 9, 11, stride, DTYPES[dtype])
    for launch in launches:
        assert f' KERNEL=7 STRIDE={stride} ' in describe(launch)
        assert_within_budget(compile_launch(launch))


# Sizes that Triton would specialise (1 becomes a constant, multiples of 16
# are marked). The kernels opt out for the map's sizes, so these maps launch
# the kernels of a plain map; the head width keeps its specialisations
# (a head width of 1 is a constant, with its own BLOCK_D).
SPECIAL_MAPS = {
    'D=1': (1, 9, 11),
    'H=W=1': (16, 1, 1),
    'H=1': (32, 1, 11),
    'W=1': (16, 9, 1),
    'x16': (32, 32, 64),
}
MAP_SIZES = ('H', 'W', 'HO', 'WO')


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('name', list(SPECIAL_MAPS))
def test_special_sizes_launch_the_plain_kernels(name, stride):
    d, h, w = SPECIAL_MAPS[name]
    dtype = DTYPES[['float32', 'float16', 'bfloat16'][stride]]  # by stride
    launches = op_launches(d, h, w, stride, dtype)
    plain = op_launches(d, 9, 11, stride, dtype)
    assert [describe(x) for x in launches] == [describe(x) for x in plain]
    for launch in launches:
        text = describe(launch).split()
        assert ('D=1' in text) == (d == 1), text
        for size in MAP_SIZES:
            assert f'{size}=1' not in text and f'{size}%16' not in text
        assert_within_budget(compile_launch(launch))


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('head_width', [5, 24])
def test_other_head_widths_within_budget(head_width, stride):
    dtype = DTYPES[['float32', 'bfloat16', 'float16'][stride]]  # by stride
    for launch in op_launches(head_width, 9, 11, stride, dtype):
        assert_within_budget(compile_launch(launch), REGISTERS_ANY_WIDTH)


@pytest.mark.parametrize('stride', [1, 2])
def test_misaligned_tensors_within_budget(stride):
    # Views that start one element into their storage: no pointer is known
    # to be 16-byte aligned, which Triton compiles as another kernel.
    for launch in op_launches(16, 9, 11, stride, torch.float16, offset=1):
        assert describe(launch).split()[1].startswith('unaligned=')
        assert_within_budget(compile_launch(launch))


def test_reflection_division_does_not_grow_with_kernel_size():
    counts = {}
    for kernel_size in (3, 7):
        launches = op_launches(16, 9, 11, 1, torch.float32, kernel_size)
        firsts = {}
        for launch in launches:
            firsts.setdefault(launch.name, launch)
        for name, launch in firsts.items():
            compiled = compile_launch(launch)
            assert f'KERNEL={kernel_size}' in compiled.specialisation
            counts[name, kernel_size] = (
                compiled.div_rem(),
                compiled.div_rem_in_loops(),
            )
    for name in {name for name, _ in counts}:
        # One remainder per axis and pixel, none inside the window loops.
        assert counts[name, 3] == counts[name, 7] == (2, 0), counts


LOOP_PTX = """
    rem.s32 %r1, %r2, %r3;
$L__BB0_1:
    add.s32 %r4, %r4, 1;
    @%p1 rem.s32 %r5, %r4, %r3;
    div.rn.f32 %f1, %f2, %f3;
    setp.lt.s32 %p2, %r4, %r6;
    @%p2 bra $L__BB0_1;
    @%p3 atom.global.gpu.relaxed.add.f32 %f4, [%rd1], %f5;
    div.u32 %r7, %r8, %r9;
$L__BB0_2:
    ret;
"""


def handmade(**fields) -> Compiled:
    """A `Compiled` within every budget, but for ``fields``."""
    base = dict(name='k', specialisation='fp32', num_warps=1, registers=0)
    base.update(stack=0, spill_stores=0, spill_loads=0, shared=0)
    base.update(ptx='.target sm_90a\n' + LOOP_PTX, ttgir='', cubin=b'x')
    return Compiled(**{**base, **fields})


def test_division_counts_find_loops():
    # Integer div/rem only (not float division), and the one in the loop.
    compiled = handmade()
    assert compiled.atomics() == ['atom.global.gpu.relaxed.add.f32']
    assert compiled.div_rem() == 3
    assert compiled.div_rem_in_loops() == 1


@triton.jit
def _folding_in_a_loop(x_ptr, size, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    for t in range(n):
        total += tl.load(x_ptr + (offsets + t) % size)
    tl.store(x_ptr + offsets, total)


def test_gates_see_a_division_inside_a_loop():
    # A kernel that folds its index with a runtime remainder in the loop
    # (as the kernels once did for every window offset) fails the gate.
    x = torch.zeros(64)
    launch = Launch(_folding_in_a_loop, (x, 37, 7), {'BLOCK': 64})
    assert compile_launch(launch).div_rem_in_loops() >= 1


def test_budget_violations_name_each_problem():
    assert (
        budget_violations(handmade(), registers=168, div_rem_in_loops=1) == []
    )
    compiled = handmade(
        registers=200,
        stack=16,
        spill_stores=8,
        spill_loads=4,
        shared=512,
        ptx='.target sm_80\n' + LOOP_PTX,
        cubin=b'',
    )
    assert budget_violations(compiled, registers=168) == [
        'k [fp32]: the PTX does not target sm_90a',
        'k [fp32]: no cubin',
        'k [fp32]: spills: 8 bytes stored, 4 loaded',
        'k [fp32]: a stack frame of 16 bytes',
        'k [fp32]: 200 registers > 168',
        'k [fp32]: 512 bytes of shared memory',
        'k [fp32]: 1 integer div/rem inside loops',
    ]


def summary() -> str:
    """Markdown table of the gates per kernel and head width, over every
    dtype, both strides and every autotune config (for the docs)."""
    rows = {}
    for dtype in DTYPES.values():
        for stride in (1, 2):
            for width in (16, 32, 64, 128):
                for launch in op_launches(width, 9, 11, stride, dtype):
                    compiled = compile_launch(launch)
                    kwargs = launch.kwargs
                    tile = kwargs['BLOCK_H'] * kwargs['BLOCK_W']
                    row = rows.setdefault(
                        (compiled.name, width),
                        {'tiles': set(), 'registers': [], 'other': set()},
                    )
                    row['tiles'].add((tile, compiled.num_warps))
                    row['registers'].append(compiled.registers)
                    row['other'].add(
                        (
                            compiled.spill_stores + compiled.spill_loads,
                            compiled.stack,
                            compiled.shared,
                            compiled.div_rem(),
                            compiled.div_rem_in_loops(),
                        )
                    )
    lines = [
        '| kernel | head width | tiles (pixels x warps) | registers | '
        'spill bytes, stack, shared | int div/rem (in loops) |',
        '| --- | --- | --- | --- | --- | --- |',
    ]
    for (name, width), row in rows.items():
        tiles = ', '.join(f'{p}x{w}' for p, w in sorted(row['tiles']))
        other = sorted(row['other'])
        spills = {f'{s}, {k}, {m}' for s, k, m, _, _ in other}
        divisions = {f'{d} ({loops})' for _, _, _, d, loops in other}
        lines.append(
            f'| `{name.strip("_")}` | {width} | {tiles} | '
            f'{min(row["registers"])}-{max(row["registers"])} | '
            f'{" / ".join(sorted(spills))} | '
            f'{" / ".join(sorted(divisions))} |'
        )
    return '\n'.join(lines)


if __name__ == '__main__':
    # python tests/test_ops/test_triton_gates.py: the table of the docs.
    print(f'triton {triton.__version__}, sm_90a\n')
    print(summary())
