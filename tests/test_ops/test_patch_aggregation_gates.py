"""Static gates of SAN's patch aggregation kernels, compiled for Hopper
without a GPU (triton_gates.py, as for the local attention).

Every launch of one forward and backward of the op is compiled by Triton's
own compiler for sm_90a, for every dtype, SAN's window sizes (3 and 7), 8
channels a group (SAN's) with the group counts of ACmix-SAN's stages, and
the integer specialisations Triton makes at run time, and must stay within
a stated budget:

* no register spills and no stack frame;
* at most 128 registers per thread (float32 and half inputs; 168 for
  float64), so that 16 warps fit on a Hopper SM;
* no shared memory: the backward's sum over a group's channels stays in
  registers;
* the warps split the pixels only, never a group's channels;
* no integer division or remainder inside the window loops, as many for a
  3x3 window as for a 7x7 one, wherever the map is at least as large as
  the window's half-width (smaller maps fold the reflection periodically,
  with remainders inside the loops).

The kernels opt out of specialising the group count and the map's sizes,
so one group, maps with a side of 1 and sides divisible by 16 launch the
kernels of a plain map (tiny maps their periodic variant).
"""

import re

import pytest
import torch

triton = pytest.importorskip('triton')

from triton_gates import (  # noqa: E402
    Compiled,
    compile_launch,
    describe,
    record_launches,
)

from mmacmix.ops import patch_aggregation_triton as kernels  # noqa: E402

pytestmark = pytest.mark.skipif(
    kernels.INTERPRETED, reason='this process runs under TRITON_INTERPRET=1'
)

REGISTERS = 128
REGISTERS_FLOAT64 = 168
KERNELS = ('_forward_kernel', '_backward_kernel')
DTYPES = {
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16,
    'float64': torch.float64,
}
SHARE = 8  # SAN's channels a group
# Groups of ACmix-SAN's attention at stages 0 to 4 (16 to 512 channels).
SAN_GROUPS = (2, 8, 16, 32, 64)


def op_launches(groups, h, w, kernel_size, dtype, share=SHARE, offset=0):
    """Every launch of one forward and backward; ``offset`` elements before
    each tensor's start (misaligned views)."""

    def tensor(*shape):
        size = torch.Size(shape).numel()
        return torch.zeros(size + offset, dtype=dtype)[offset:].view(shape)

    values = tensor(2, share * groups, h, w)
    weights = tensor(2, groups, kernel_size**2, h, w)

    def run():
        kernels.forward(values, weights, kernel_size)
        kernels.backward(values, values, weights, kernel_size)

    launches = record_launches(kernels, KERNELS, run)
    assert [launch.name for launch in launches] == list(KERNELS)
    return launches


def assert_within_budget(compiled: Compiled, dtype: str) -> None:
    where = f'{compiled.name} [{compiled.specialisation}]'
    registers = REGISTERS_FLOAT64 if dtype == 'float64' else REGISTERS
    assert re.search(r'^\.target sm_90a$', compiled.ptx, re.M), where
    assert compiled.cubin, where
    assert compiled.spill_stores == compiled.spill_loads == 0, where
    assert compiled.stack == 0, where
    assert compiled.registers <= registers, (where, compiled.registers)
    assert compiled.shared == 0, (where, compiled.shared)
    # Tiles are (channels, pixels): warps on the pixels only.
    layouts = [w for w in compiled.warps_per_cta() if len(w) == 2]
    assert layouts, where
    assert all(warps[0] == 1 for warps in layouts), (where, layouts)
    if 'PERIODIC=False' in compiled.specialisation:
        assert compiled.div_rem_in_loops() == 0, where


@pytest.mark.parametrize('kernel_size', [3, 7])
@pytest.mark.parametrize('dtype', list(DTYPES))
def test_every_launch_within_budget(dtype, kernel_size):
    for launch in op_launches(8, 9, 11, kernel_size, DTYPES[dtype]):
        text = describe(launch)
        assert f'KERNEL={kernel_size} SHARE=8 BLOCK_S=8 ' in text, text
        assert 'PERIODIC=False' in text, text
        assert_within_budget(compile_launch(launch), dtype)


# (groups, h, w): one group, SAN's group counts, sides of 1 and multiples
# of 16, all of which Triton would specialise.
SPECIAL = {
    'G=1': (1, 9, 11),
    **{f'G={g}': (g, 9, 11) for g in SAN_GROUPS},
    'H=W=1': (8, 1, 1),
    'H=1': (8, 1, 11),
    'W=1': (8, 9, 1),
    'x16': (16, 32, 64),
}


@pytest.mark.parametrize('name', list(SPECIAL))
def test_special_sizes_launch_the_plain_kernels(name):
    groups, h, w = SPECIAL[name]
    dtype = ('float32', 'float16', 'bfloat16')[len(name) % 3]
    launches = op_launches(groups, h, w, 7, DTYPES[dtype])
    plain = op_launches(8, 9, 11, 7, DTYPES[dtype])
    periodic = 7 // 2 >= min(h, w)
    for launch, reference in zip(launches, plain):
        text, expected = describe(launch), describe(reference)
        if periodic:
            expected = expected.replace('PERIODIC=False', 'PERIODIC=True')
        assert text == expected
        for size in ('G', 'H', 'W'):
            assert f'{size}=1' not in text.split()
            assert f'{size}%16' not in text.split()
        assert_within_budget(compile_launch(launch), dtype)


def test_misaligned_tensors_within_budget():
    # Views one element into their storage: no pointer known to be 16-byte
    # aligned, which Triton compiles as another kernel.
    for launch in op_launches(8, 9, 11, 7, torch.float16, offset=1):
        assert describe(launch).split()[1].startswith('unaligned=')
        assert_within_budget(compile_launch(launch), 'float16')


def test_reflection_division_does_not_grow_with_kernel_size():
    counts = {}
    for kernel_size in (3, 7):
        for launch in op_launches(8, 9, 11, kernel_size, torch.float32):
            compiled = compile_launch(launch)
            counts[launch.name, kernel_size] = (
                compiled.div_rem(),
                compiled.div_rem_in_loops(),
            )
    for name in KERNELS:
        # The tile's and group's indices, once; nothing in the loops.
        assert counts[name, 3] == counts[name, 7], counts
        assert counts[name, 7][1] == 0, counts
