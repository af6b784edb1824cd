"""SAN's patch aggregation op: its PyTorch implementation against a float64
reference built from Python's reflection, its contract and its errors.
(The Triton kernels: test_patch_aggregation_triton.py.)"""

import pytest
import torch

from mmacmix.ops import patch_aggregation
from mmacmix.ops.patch_aggregation import triton_available


def reflect(index: int, size: int) -> int:
    """Reflection without edge repeat, applied until inside the axis."""
    if size == 1:
        return 0
    while not 0 <= index < size:
        index = -index if index < 0 else 2 * (size - 1) - index
    return index


def reference(values, weights, kernel_size: int):
    """The aggregation by advanced indexing: ``(B, C, k, k, H, W)`` windows
    times the weights repeated over the channels of each group."""
    b, c, h, w = values.shape
    groups, p = weights.shape[1], kernel_size // 2
    taps = range(kernel_size)
    rows = torch.tensor(
        [[reflect(i + t - p, h) for i in range(h)] for t in taps]
    )
    cols = torch.tensor(
        [[reflect(j + t - p, w) for j in range(w)] for t in taps]
    )
    windows = values[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    shaped = weights.view(b, groups, kernel_size, kernel_size, h, w)
    # Channel s * G + g uses group g: the groups tiled C / G times.
    return (windows * shaped.repeat(1, c // groups, 1, 1, 1, 1)).sum((2, 3))


def make_inputs(b, share, groups, h, w, kernel_size, seed=0):
    """values, weights and an output gradient, float64."""
    generator = torch.Generator().manual_seed(seed)
    shapes = (
        (b, share * groups, h, w),
        (b, groups, kernel_size**2, h, w),
        (b, share * groups, h, w),
    )
    return [
        torch.randn(s, generator=generator, dtype=torch.float64)
        for s in shapes
    ]


def outputs_and_grads(function, values, weights, grad):
    values = values.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    out = function(values, weights)
    out.backward(grad)
    return out.detach(), values.grad, weights.grad


@pytest.mark.parametrize(
    'case',
    [
        (2, 8, 2, 9, 11, 7),
        (1, 4, 3, 1, 1, 5),
        (1, 3, 2, 2, 3, 5),
        (1, 2, 2, 1, 7, 3),
        (1, 1, 1, 6, 1, 3),
        (1, 2, 2, 5, 4, 1),
    ],
    ids=str,
)
def test_pytorch_matches_reference(case):
    *sizes, kernel_size = case
    values, weights, grad = make_inputs(*sizes, kernel_size)
    got = outputs_and_grads(
        lambda v, w: patch_aggregation(v, w, kernel_size, impl='pytorch'),
        values,
        weights,
        grad,
    )
    expected = outputs_and_grads(
        lambda v, w: reference(v, w, kernel_size), values, weights, grad
    )
    for a, b in zip(got, expected):
        assert a.dtype == torch.float64
        assert (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_is_summed_in_float32(dtype):
    values, weights, grad = make_inputs(1, 8, 2, 6, 7, 3)
    half = [x.to(dtype) for x in (values, weights, grad)]
    got = outputs_and_grads(lambda v, w: patch_aggregation(v, w, 3), *half)
    expected = outputs_and_grads(
        lambda v, w: reference(v, w, 3), *(x.double() for x in half)
    )
    # Sums in float32, so each result is off by one rounding to the half
    # dtype (half a unit in the last place), plus float32's own error.
    unit = {torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        error = (a.double() - b).abs().max().item()
        assert error <= 1.01 * unit * b.abs().max().item()


def test_keeps_only_its_inputs_for_backward():
    values, weights, _ = make_inputs(1, 8, 2, 9, 11, 7)
    values.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = patch_aggregation(values, weights, 7)
    assert out.grad_fn is not None
    assert sum(saved) <= values.numel() + weights.numel()


def test_double_backward_raises():
    values, weights, grad = make_inputs(1, 2, 1, 4, 5, 3)
    values.requires_grad_()
    out = patch_aggregation(values, weights, 3)
    (first,) = torch.autograd.grad(out, values, grad, create_graph=True)
    with pytest.raises(RuntimeError):
        first.sum().backward()


def test_invalid_arguments():
    values, weights, _ = make_inputs(1, 2, 2, 4, 4, 3)
    with pytest.raises(ValueError, match='impl must be one of'):
        patch_aggregation(values, weights, 3, impl='cuda')
    with pytest.raises(ValueError, match='odd integer'):
        patch_aggregation(values, weights, 2)
    with pytest.raises(ValueError, match=r'\(B, G, 25, H, W\)'):
        patch_aggregation(values, weights, 5)
    with pytest.raises(ValueError, match='dividing the 3 channels'):
        patch_aggregation(values[:, :3], weights, 3)
    with pytest.raises(ValueError, match='values must be'):
        patch_aggregation(values[0], weights, 3)
    with pytest.raises(TypeError, match='floating'):
        patch_aggregation(values.long(), weights, 3)


def test_triton_on_cpu_needs_the_interpreter():
    if triton_available('cpu'):
        pytest.skip('this process runs under TRITON_INTERPRET=1')
    values, weights, _ = make_inputs(1, 2, 2, 4, 4, 3)
    with pytest.raises(RuntimeError, match='TRITON_INTERPRET=1'):
        patch_aggregation(values, weights, 3, impl='triton')
