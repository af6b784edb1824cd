"""The Triton kernels of SAN's patch aggregation, without a GPU.

Triton reads ``TRITON_INTERPRET`` when its kernels are defined, so the cases
run in one child process started with ``TRITON_INTERPRET=1`` (this file run
as a script), where ``impl='triton'`` runs the kernels on CPU tensors in
Triton's interpreter, through the registered op and its autograd. Each case
compares the output and the gradients of values and weights with the
float64 reference of test_patch_aggregation.py. On a CUDA machine the same
cases also run on the GPU, in-process.
"""

import json

import pytest
import torch
from interpreter import relative_errors, run_interpreted
from test_patch_aggregation import make_inputs, outputs_and_grads, reference

from mmacmix.ops import patch_aggregation
from mmacmix.ops.patch_aggregation import triton_available

# (batch, channels a group, groups, h, w, kernel_size, dtype): SAN's 8
# channels a group and others, odd sizes, H and W of 1, a map smaller
# than the window, several batch elements and groups, every dtype.
CASES = [
    (1, 8, 2, 9, 11, 7, 'float32'),
    (2, 4, 1, 7, 6, 3, 'float32'),
    (1, 3, 2, 1, 1, 5, 'float64'),
    (1, 2, 2, 1, 7, 3, 'float32'),
    (1, 2, 1, 6, 1, 3, 'float32'),
    (1, 4, 2, 2, 3, 5, 'float64'),
    (1, 8, 1, 16, 16, 3, 'float32'),
    (1, 8, 2, 9, 10, 7, 'float16'),
    (1, 8, 1, 6, 7, 5, 'bfloat16'),
]
# Largest error against the float64 reference (computed from the inputs as
# rounded to the tested dtype) relative to max(1, largest reference value):
# float32 sums, then one rounding to the tested dtype.
TOLERANCE = {
    'float64': 1e-12,
    'float32': 1e-5,
    'float16': 2e-3,
    'bfloat16': 1.6e-2,
}
NAMES = ('out', 'grad_values', 'grad_weights')


def case_errors(case, device: str = 'cpu') -> dict[str, float]:
    """Relative errors of one case run with ``impl='triton'``."""
    *sizes, kernel_size, dtype_name = case
    dtype = getattr(torch, dtype_name)
    inputs = [x.to(dtype) for x in make_inputs(*sizes, kernel_size)]
    got = outputs_and_grads(
        lambda v, w: patch_aggregation(v, w, kernel_size, impl='triton'),
        *(x.to(device) for x in inputs),
    )
    expected = outputs_and_grads(
        lambda v, w: reference(v, w, kernel_size),
        *(x.double() for x in inputs),
    )
    return relative_errors(NAMES, got, expected, dtype)


@pytest.fixture(scope='module')
def interpreted_errors() -> list[dict[str, float]]:
    return run_interpreted(__file__)


@pytest.mark.parametrize('index', range(len(CASES)), ids=str)
def test_interpreted_kernels_match_reference(interpreted_errors, index):
    tolerance = TOLERANCE[CASES[index][-1]]
    for name, error in interpreted_errors[index].items():
        assert error < tolerance, f'{CASES[index]} {name}: {error:.3g}'


@pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available('cuda'),
    reason='no CUDA device with triton',
)
@pytest.mark.parametrize('index', range(len(CASES)), ids=str)
def test_cuda_kernels_match_reference(index):
    tolerance = TOLERANCE[CASES[index][-1]]
    for name, error in case_errors(CASES[index], 'cuda').items():
        assert error < tolerance, f'{CASES[index]} {name}: {error:.3g}'


@pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available('cuda'),
    reason='no CUDA device with triton',
)
def test_cuda_auto_runs_triton(monkeypatch):
    from mmacmix.ops.patch_aggregation import _triton_kernels

    calls = []
    kernels = _triton_kernels()
    forward = kernels.forward
    monkeypatch.setattr(
        kernels, 'forward', lambda *a: calls.append(1) or forward(*a)
    )
    values, weights, _ = make_inputs(1, 8, 2, 9, 11, 7)
    patch_aggregation(values.float().cuda(), weights.float().cuda(), 7)
    assert calls == [1]


if __name__ == '__main__':
    # The child process of `interpreted_errors`: one JSON line of errors.
    assert triton_available('cpu'), 'run with TRITON_INTERPRET=1'
    print(json.dumps([case_errors(case) for case in CASES]))
