"""The Triton kernels of the local attention, without a GPU.

Triton reads ``TRITON_INTERPRET`` when its kernels are defined, so the cases
run in one child process started with ``TRITON_INTERPRET=1`` (this file run
as a script), where ``impl='triton'`` runs the kernels on CPU tensors in
Triton's interpreter, through the registered op and its autograd.  Each case
compares the output and the gradients of q, k and v with the float64 unfold
reference of test_local_attention.py.  On a CUDA machine the same cases
also run on the GPU, in-process.  The kernels compiled for Hopper, with
their registers, spills and layouts: test_triton_gates.py.
"""

import contextlib
import json

import pytest
import torch
from interpreter import relative_errors, run_interpreted
from test_local_attention import make_inputs, outputs_and_grads, reference

from mmacmix.ops import local_attention, triton_available

# (n, d, h, w, kernel_size, stride, dtype): odd sizes, both strides, a map
# smaller than the window, kernel sizes 3 and 7 (and 5), every dtype, and
# sizes of 1 (head width, rows, columns, all three).
CASES = [
    (2, 5, 9, 11, 7, 1, 'float32'),
    (2, 4, 9, 11, 7, 2, 'float32'),
    (1, 4, 5, 7, 3, 1, 'float32'),
    (2, 3, 7, 6, 3, 2, 'float32'),
    (1, 4, 2, 3, 7, 1, 'float32'),
    (1, 4, 3, 2, 7, 2, 'float32'),
    (2, 16, 12, 10, 7, 1, 'float32'),
    (1, 3, 6, 5, 5, 2, 'float64'),
    (2, 8, 9, 10, 7, 1, 'float16'),
    (2, 8, 9, 10, 5, 2, 'float16'),
    (2, 8, 9, 10, 7, 1, 'bfloat16'),
    (1, 4, 3, 5, 7, 2, 'bfloat16'),
    (2, 1, 9, 11, 7, 1, 'float32'),
    (1, 3, 1, 9, 7, 2, 'float32'),
    (2, 4, 8, 1, 3, 1, 'float16'),
    (1, 1, 1, 1, 7, 1, 'float64'),
    (2, 2, 1, 1, 5, 2, 'bfloat16'),
]
# Largest error against the float64 reference, computed from the inputs as
# rounded to the tested dtype, relative to max(1, largest reference value).
# Half precision rounds the output and the gradients once (unit roundoff
# 4.9e-4 for float16, 3.9e-3 for bfloat16), and the inputs of the backward
# (grad_out) once more: a few units of roundoff.
TOLERANCE = {
    'float64': 1e-10,
    'float32': 1e-5,
    'float16': 4e-3,
    'bfloat16': 3e-2,
}
NAMES = ('out', 'grad_q', 'grad_k', 'grad_v')
KERNELS = ('forward_kernel', 'backward_q_kernel', 'backward_kv_kernel')


def case_errors(case, device: str = 'cpu') -> dict[str, float]:
    """Relative errors of one case run with ``impl='triton'``."""
    n, d, h, w, kernel_size, stride, dtype_name = case
    dtype = getattr(torch, dtype_name)
    q, k, v, grad = (
        x.to(dtype) for x in make_inputs(n, d, h, w, stride, torch.float32)
    )
    got = outputs_and_grads(
        lambda *x: local_attention(*x, kernel_size, stride, impl='triton'),
        *(x.to(device) for x in (q, k, v, grad)),
    )
    pad = 'reflect' if kernel_size // 2 < min(h, w) else 'index'
    expected = outputs_and_grads(
        lambda *x: reference(*x, kernel_size, stride, pad),
        *(x.double() for x in (q, k, v, grad)),
    )
    return relative_errors(NAMES, got, expected, dtype)


@pytest.fixture(scope='module')
def interpreted_errors() -> list[dict[str, float]]:
    return run_interpreted(__file__)


@pytest.mark.parametrize('index', range(len(CASES)), ids=str)
def test_interpreted_kernels_match_reference(interpreted_errors, index):
    tolerance = TOLERANCE[CASES[index][-1]]
    for name, error in interpreted_errors['errors'][index].items():
        assert error < tolerance, f'{CASES[index]} {name}: {error:.3g}'


def test_interpreter_runs_one_config(interpreted_errors):
    # The interpreter cannot time configurations: one tile, no autotuning.
    assert interpreted_errors['configs'] == [1, 1, 1]


def test_triton_on_cpu_needs_the_interpreter():
    if triton_available('cpu'):
        pytest.skip('this process runs under TRITON_INTERPRET=1')
    q, k, v, _ = make_inputs(1, 3, 6, 7, 1)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        local_attention(q, k, v, impl='triton')


def test_kernels_launch_under_the_inputs_device_guard(monkeypatch):
    # Triton launches on the current CUDA device: every launch must happen
    # while the inputs' device is made current. Meta tensors run the host
    # code without a GPU; the stand-in kernels record the guard in force.
    kernels = pytest.importorskip('mmacmix.ops.local_attention_triton')
    entered, launched = [], []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        yield
        entered.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(list(entered))

    monkeypatch.setattr(kernels, 'device_guard', guard)
    for name in KERNELS:
        monkeypatch.setattr(kernels, name, Kernel())
    q = torch.empty(2, 4, 5, 6, device='meta')
    lse = torch.empty(2, 5, 6, device='meta')
    kernels.forward(q, q, q, 7, 1)
    kernels.backward(q, q, q, q, lse, 7, 1)
    assert launched == [[q.device]] * 3
    assert entered == []


def test_device_guard_makes_the_cuda_device_current():
    # Only what can be checked without a GPU: the guard chosen for a second
    # CUDA device selects it (entering it needs the device).
    kernels = pytest.importorskip('mmacmix.ops.local_attention_triton')
    guard = kernels.device_guard(torch.device('cuda', 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    cpu_guard = kernels.device_guard(torch.device('cpu'))
    assert isinstance(cpu_guard, contextlib.nullcontext)


def test_samples_beyond_32_bit_offsets_are_refused():
    kernels = pytest.importorskip('mmacmix.ops.local_attention_triton')
    q = torch.empty(1, 2048, 1024, 1024, device='meta')
    message = (
        'the Triton local attention takes under 2**31 elements per sample '
        'and head (32-bit offsets), got D x H x W = 2048x1024x1024'
    )
    with pytest.raises(ValueError) as error:
        kernels.forward(q, q, q, 7, 1)
    assert str(error.value) == message


def test_autotune_is_small_and_never_empty():
    kernels = pytest.importorskip('mmacmix.ops.local_attention_triton')
    if kernels.INTERPRETED:
        pytest.skip('this process runs under TRITON_INTERPRET=1')
    for name in KERNELS:
        tuner = getattr(kernels, name)
        for block_d in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for fp64 in (False, True):
                kept = tuner.early_config_prune(
                    tuner.configs, {}, BLOCK_D=block_d, FP64=fp64
                )
                assert 1 <= len(kept) <= 3, (name, block_d, fp64, kept)


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
    torch.cuda.device_count() < 2 or not triton_available('cuda'),
    reason='needs two CUDA devices with triton',
)
def test_cuda_kernels_run_on_the_inputs_device():
    # Inputs on the second device while the first is current.
    with torch.cuda.device(0):
        errors = case_errors(CASES[0], 'cuda:1')
    for name, error in errors.items():
        assert error < TOLERANCE['float32'], f'{name}: {error:.3g}'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
def test_cuda_half_precision_stays_half(impl):
    q, k, v, grad = make_inputs(2, 16, 20, 30, 1, torch.float32)
    inputs = [x.cuda().half().requires_grad_() for x in (q, k, v)]
    out = local_attention(*inputs, impl=impl)
    out.backward(grad.cuda().half())
    assert out.dtype == torch.float16
    assert all(x.grad.dtype == torch.float16 for x in inputs)
    expected = reference(*(x.detach().double().cpu() for x in inputs))
    error = (out.double().cpu() - expected).abs().max().item()
    assert error < TOLERANCE['float16'] * max(1.0, expected.abs().max())


if __name__ == '__main__':
    # The child process of `interpreted_errors`: one JSON line of errors.
    assert triton_available('cpu'), 'run with TRITON_INTERPRET=1'
    from mmacmix.ops import local_attention_triton as kernels

    torch.manual_seed(0)
    configs = [len(getattr(kernels, name).configs) for name in KERNELS]
    errors = [case_errors(case) for case in CASES]
    print(json.dumps({'configs': configs, 'errors': errors}))
