"""The pixel shift products (X-volution's PSSA) as an op: the compiled
kernel's tiles and the PyTorch path's row blocks against the whole map in
float64, forward and backward, the ``impl`` switch, torch.compile."""

import functools
import warnings

import pytest
import torch

from mmacmix.ops import native as native_module
from mmacmix.ops import pixel_shift as pixel_shift_module
from mmacmix.ops.pixel_shift import pixel_shift_attention, shift_products


@pytest.mark.parametrize('impl', ['native', 'pytorch'])
@pytest.mark.parametrize(
    'stride, dilation, size',
    [(1, 1, (7, 9)), (2, 1, (9, 6)), (2, 2, (8, 7)), (1, 3, (10, 5))],
)
def test_tiles_and_blocks_equal_the_whole_map_forward_and_backward(
    impl, stride, dilation, size, monkeypatch
):
    # Tiles of one row and blocks of one channel (the compiled kernel,
    # which then runs its backward in several phases), or blocks of one row
    # (the PyTorch path): every border is crossed. The whole map through
    # autograd (stacked products, one matrix product) is the independent
    # reference, in float64.
    if impl == 'native':
        if not pixel_shift_module.native_available():
            pytest.skip('mmacmix was built without its compiled kernels')
        monkeypatch.setattr(pixel_shift_module, 'TILE_POSITIONS', 1)
        monkeypatch.setattr(pixel_shift_module, 'BLOCK_BYTES', 1)
    else:
        monkeypatch.setattr(pixel_shift_module, 'BLOCK_ELEMENTS', 1)
        x = torch.zeros(2, 3, *size)
        rows = pixel_shift_module._ProductRows(x, dilation, stride)
        assert len(rows.blocks) > 2
    pssa = functools.partial(pixel_shift_attention, impl=impl)
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 27, dtype=torch.float64, requires_grad=True)
    products = shift_products(x, dilation, stride)
    expected = torch.einsum('ok,bkhw->bohw', weight, products)
    out_grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), out_grad)
    out = pssa(x, weight, dilation, stride)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, weight), out_grad)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
    # Only the gradient asked for.
    (grad_x,) = torch.autograd.grad(
        pssa(x, weight.detach(), dilation, stride),
        x,
        out_grad,
    )
    torch.testing.assert_close(
        grad_x, expected_grads[0], rtol=1e-12, atol=1e-12
    )
    # Without gradients: added in place into a given map (the deployed op's
    # convolution output), contiguous or not.
    for base in (
        torch.randn_like(expected),
        torch.randn_like(expected).contiguous(
            memory_format=torch.channels_last
        ),
    ):
        with torch.no_grad():
            summed = pssa(x, weight, dilation, stride, base.clone())
        torch.testing.assert_close(
            summed, expected.detach() + base, rtol=1e-12, atol=1e-12
        )


def test_compiled_pssa_at_a_real_width_in_float64_and_float32():
    # The default tiling at a ResNet width: several tiles, and the threads'
    # partial weight gradients summed. The whole map through autograd in
    # float64 is the reference.
    if not pixel_shift_module.native_available():
        pytest.skip('mmacmix was built without its compiled kernels')
    torch.manual_seed(0)
    x = torch.randn(2, 64, 23, 41, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, 9 * 64, dtype=torch.float64) / 24
    weight.requires_grad_()
    expected = torch.einsum('ok,bkhw->bohw', weight, shift_products(x, 1))
    out_grad = torch.randn_like(expected)
    expected = [
        expected,
        *torch.autograd.grad(expected, (x, weight), out_grad),
    ]
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, weight)]
        out = pixel_shift_attention(*inputs, 1)
        grads = torch.autograd.grad(out, inputs, out_grad.to(dtype))
        for result, reference in zip((out, *grads), expected, strict=True):
            assert result.dtype == dtype
            torch.testing.assert_close(
                result.double(), reference, rtol=tolerance, atol=tolerance
            )


@pytest.mark.parametrize('stride, dilation', [(1, 1), (2, 2), (1, 3)])
def test_compiled_pssa_splits_small_maps_by_output_channels(stride, dilation):
    # A map smaller than a default tile per thread: with 4 threads the
    # forward runs 2 tiles x 2 halves of the 37 output channels (18 + 19),
    # alone and added in place. The whole map in float64 is the reference.
    if not pixel_shift_module.native_available():
        pytest.skip('mmacmix was built without its compiled kernels')
    torch.manual_seed(0)
    x = torch.randn(1, 16, 13, 21, dtype=torch.float64)
    weight = torch.randn(37, 9 * 16, dtype=torch.float64)
    base = torch.randn(1, 37, *(-(-side // stride) for side in (13, 21)))
    base = base.double()
    products = shift_products(x, dilation, stride)
    expected = torch.einsum('ok,bkhw->bohw', weight, products)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        out = pixel_shift_attention(x, weight, dilation, stride)
        summed = pixel_shift_attention(
            x, weight, dilation, stride, base.clone()
        )
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(summed, expected + base, rtol=1e-12, atol=1e-12)


def test_impl_is_checked_and_both_impls_agree():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 27, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto'"):
        pixel_shift_attention(x, weight, 1, impl='triton')
    with pytest.raises(RuntimeError, match='float32 or float64 CPU'):
        pixel_shift_attention(x.bfloat16(), weight, 1, impl='native')
    if not pixel_shift_module.native_available():
        pytest.skip('mmacmix was built without its compiled kernels')
    out_grad = torch.randn(2, 5, 5, 4, dtype=torch.float64)
    results = []
    for impl in ('native', 'pytorch'):
        out = pixel_shift_attention(x, weight, 2, 2, impl=impl)
        results.append((out, *torch.autograd.grad(out, (x, weight), out_grad)))
    for native, pytorch in zip(*results, strict=True):
        torch.testing.assert_close(native, pytorch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('native', [True, False])
def test_compiles_with_fullgraph_and_warns_once_without_the_kernel(
    native, monkeypatch
):
    # Without the compiled kernel the op warns once that it falls back to
    # PyTorch; the warning is raised where the op runs, never in the code
    # Dynamo traces, so fullgraph=True still sees no graph break. aot_eager
    # runs the op's fake implementation and registered backward without
    # generating code.
    if native and not pixel_shift_module.native_available():
        pytest.skip('mmacmix was built without its compiled kernels')
    if not native:
        monkeypatch.setattr(pixel_shift_module, 'native_ops', None)
    monkeypatch.setattr(native_module, '_warned_ops', set())
    torch._dynamo.reset()

    def branch(x, weight, base):
        return pixel_shift_attention(x, weight, 1, 2) + base.sin()

    compiled = torch.compile(branch, fullgraph=True, backend='aot_eager')
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    weight = torch.randn(4, 27, requires_grad=True)
    base = torch.randn(2, 4, 5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        results = []
        for function in (branch, compiled, compiled):
            out = function(x, weight, base)
            grads = torch.autograd.grad(out.square().sum(), (x, weight))
            results.append((out, *grads))
    fallbacks = [w for w in caught if 'compiled extension' in str(w.message)]
    assert len(fallbacks) == (0 if native else 1)
    for eager, traced in zip(results[0], results[1], strict=True):
        assert torch.equal(eager, traced)
