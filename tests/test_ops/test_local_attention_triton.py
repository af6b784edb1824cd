"""The Triton kernels of the local attention, without a GPU.

Triton reads ``TRITON_INTERPRET`` when its kernels are defined, so the cases
run in one child process started with ``TRITON_INTERPRET=1`` (this file run
as a script), where ``impl='triton'`` runs the kernels on CPU tensors in
Triton's interpreter, through the registered op and its autograd.  Each case
compares the output and the gradients of q, k and v with the float64 unfold
reference of test_local_attention.py.  On a CUDA machine the same cases
also run on the GPU, in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_local_attention import make_inputs, outputs_and_grads, reference

from mmacmix.ops import local_attention, triton_available

# (n, d, h, w, kernel_size, stride, dtype): odd sizes, both strides, a map
# smaller than the window, kernel sizes 3 and 7 (and 5), every dtype.
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
    errors = {}
    for name, a, b in zip(NAMES, got, expected):
        assert a.dtype == dtype and a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item())
        errors[name] = (a.cpu().double() - b).abs().max().item() / scale
    return errors


@pytest.fixture(scope='module')
def interpreted_errors() -> list[dict[str, float]]:
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, str(Path(__file__))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize('index', range(len(CASES)), ids=str)
def test_interpreted_kernels_match_reference(interpreted_errors, index):
    tolerance = TOLERANCE[CASES[index][-1]]
    for name, error in interpreted_errors[index].items():
        assert error < tolerance, f'{CASES[index]} {name}: {error:.3g}'


# The interpreter checks the kernels' logic; this checks that Triton's
# real compiler takes them (types, layouts, register allocation by ptxas)
# for a Hopper GPU (H100/H200), without one: (dtype, stride, head width).
COMPILED = [('fp16', 2, 16), ('bf16', 1, 32), ('fp32', 1, 128)]


@pytest.mark.parametrize('dtype, stride, head_dims', COMPILED)
def test_kernels_compile_for_hopper(dtype, stride, head_dims):
    triton = pytest.importorskip('triton')
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mmacmix.ops import local_attention_triton as kernels

    if kernels.INTERPRETED:
        pytest.skip('this process runs under TRITON_INTERPRET=1')
    block_d, block_h, block_w = kernels._blocks(head_dims)
    constants = dict(
        KERNEL=7,
        STRIDE=stride,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        FP64=False,
    )
    # Pointers named *_ptr are in the tested dtype except the float32
    # log-sum-exp, delta and k/v gradient buffers.
    float32 = {'lse_ptr', 'delta_ptr', 'grad_k_ptr', 'grad_v_ptr'}
    for kernel in (
        kernels._forward_kernel,
        kernels._backward_q_kernel,
        kernels._backward_kv_kernel,
    ):
        names = kernel.arg_names
        signature = {
            name: 'constexpr'
            if name in constants
            else ('*fp32' if name in float32 else f'*{dtype}')
            if name.endswith('_ptr')
            else 'i32'
            for name in names
        }
        source = ASTSource(
            fn=kernel,
            signature=signature,
            constexprs={(names.index(k),): v for k, v in constants.items()},
        )
        compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32))
        assert compiled.asm['cubin'], kernel.fn.__name__


def test_triton_on_cpu_needs_the_interpreter():
    if triton_available('cpu'):
        pytest.skip('this process runs under TRITON_INTERPRET=1')
    q, k, v, _ = make_inputs(1, 3, 6, 7, 1)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        local_attention(q, k, v, impl='triton')


@pytest.mark.skipif(
    not torch.cuda.is_available() or not triton_available('cuda'),
    reason='no CUDA device with triton',
)
@pytest.mark.parametrize('index', range(len(CASES)), ids=str)
def test_cuda_kernels_match_reference(index):
    tolerance = TOLERANCE[CASES[index][-1]]
    for name, error in case_errors(CASES[index], 'cuda').items():
        assert error < tolerance, f'{CASES[index]} {name}: {error:.3g}'


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
    torch.manual_seed(0)
    print(json.dumps([case_errors(case) for case in CASES]))
