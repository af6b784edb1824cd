"""The sliding-window local attention against plain references.

The references build the whole ``k ** 2``-fold neighbourhood the way the
official ACmix code does (reflection pad, then ``unfold``), in float64; the
operator under test never does.  Both CPU implementations are checked here:
the compiled kernel and the PyTorch loop used on other devices and when the
kernel is not built (the Triton kernels: test_local_attention_triton.py).
"""

import importlib
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from mmacmix.ops import local_attention
from mmacmix.ops import native as native_module

# `mmacmix.ops.local_attention` is also the function's name, so the module
# is fetched by import_module.
module = importlib.import_module('mmacmix.ops.local_attention')

IMPLS = [
    'pytorch',
    pytest.param(
        'native',
        marks=pytest.mark.skipif(
            not module.native_available(),
            reason='mmacmix.ops._ext is not built',
        ),
    ),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def fold(x: int, size: int) -> int:
    """Reflection index of the operator's contract, for any offset."""
    if size == 1:
        return 0
    period = 2 * (size - 1)
    x %= period
    return x if x < size else period - x


def reference(q, k, v, kernel_size=7, stride=1, pad='reflect'):
    """Softmax over unfolded windows, the official computation.

    ``pad='reflect'`` pads with ``F.pad`` as the official code does (only
    valid while the pad is smaller than the map); ``pad='index'`` gathers
    rows and columns by folded reflection, valid for any size.
    """
    n, d, h, w = k.shape
    p = kernel_size // 2
    ho, wo = q.shape[-2:]

    def windows(x):
        if pad == 'reflect':
            x = F.pad(x, (p, p, p, p), mode='reflect')
        else:
            rows = [
                fold(r - p, h) for r in range(stride * (ho - 1) + 2 * p + 1)
            ]
            cols = [
                fold(c - p, w) for c in range(stride * (wo - 1) + 2 * p + 1)
            ]
            x = x[:, :, rows][:, :, :, cols]
        unfolded = F.unfold(x, kernel_size, stride=stride)
        return unfolded.view(n, d, kernel_size**2, ho, wo)

    attention = (q.unsqueeze(2) * windows(k)).sum(1).softmax(1)
    return (attention.unsqueeze(1) * windows(v)).sum(2)


def make_inputs(n, d, h, w, stride, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ho, wo = math.ceil(h / stride), math.ceil(w / stride)
    # q scaled by head_dim ** -0.5, as ACmix feeds it.
    q = torch.randn(n, d, ho, wo, generator=generator) * d**-0.5
    k = torch.randn(n, d, h, w, generator=generator)
    v = torch.randn(n, d, h, w, generator=generator)
    grad = torch.randn(n, d, ho, wo, generator=generator)
    return [x.to(dtype) for x in (q, k, v, grad)]


def outputs_and_grads(fn, q, k, v, grad):
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad)
    return [out.detach(), *grads]


def assert_close_to_reference(
    impl, n, d, h, w, stride, kernel_size=7, dtype=torch.float64, pad=None
):
    q, k, v, grad = make_inputs(n, d, h, w, stride, dtype)
    got = outputs_and_grads(
        lambda *x: local_attention(*x, kernel_size, stride, impl=impl),
        q,
        k,
        v,
        grad,
    )
    if pad is None:
        pad = 'reflect' if kernel_size // 2 < min(h, w) else 'index'
    expected = outputs_and_grads(
        lambda *x: reference(*x, kernel_size, stride, pad),
        *(x.double() for x in (q, k, v, grad)),
    )
    for name, a, b in zip(
        ('out', 'grad_q', 'grad_k', 'grad_v'), got, expected
    ):
        assert a.dtype == dtype and a.shape == b.shape, name
        error = (a.double() - b).abs().max().item()
        assert error < TOLERANCE[dtype], f'{name}: max abs error {error:.3g}'


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize(
    'n, d, hw', [(1, 3, (9, 11)), (3, 16, (12, 10)), (3, 3, (7, 7))]
)
def test_matches_unfold_reference(impl, dtype, stride, n, d, hw):
    assert_close_to_reference(impl, n, d, *hw, stride, dtype=dtype)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize(
    'hw',
    [(5, 150), (6, 21), (4, 67)],
    ids=['wide-rows', 'narrow-rows', 'uneven-rows'],
)
def test_long_rows(impl, stride, hw):
    # The kernel sums columns in blocks of four vectors and of one (at
    # AVX-512, 64 and 16 float32 or 32 and 8 float64); these widths cover
    # full, moved-back and short blocks.
    for dtype in (torch.float64, torch.float32):
        assert_close_to_reference(impl, 2, 5, *hw, stride, dtype=dtype)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize(
    'kernel_size, stride', [(1, 1), (1, 2), (3, 1), (5, 2), (9, 1), (5, 3)]
)
def test_kernel_sizes_and_strides(impl, kernel_size, stride):
    assert_close_to_reference(impl, 2, 4, 11, 13, stride, kernel_size)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('hw', [(1, 1), (2, 3), (3, 5), (1, 8), (6, 2)])
def test_maps_smaller_than_the_window(impl, stride, hw):
    # The window (7x7) is wider than the map: reflection folds repeatedly.
    assert_close_to_reference(impl, 2, 3, *hw, stride, pad='index')


def test_fold_index_matches_reflection_padding():
    for size in (1, 2, 3, 5):
        positions = torch.arange(-9, 9 + size)
        expected = [fold(x, size) for x in positions.tolist()]
        assert module.fold_index(positions, size).tolist() == expected
    x = torch.arange(7.0).view(1, 1, 7)
    padded = F.pad(x, (3, 3), mode='reflect')
    folded = x[..., module.fold_index(torch.arange(-3, 10), 7)]
    assert torch.equal(padded, folded)


@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('stride', [2, 3])
def test_rows_no_window_reads_get_zero_gradient(impl, stride):
    # A 1x1 window at stride s reads every s-th row and column only.
    # NaN-filled blocks of the gradients' size are freed first, so that a
    # gradient left unwritten anywhere would show up.
    q, k, v, grad = make_inputs(2, 3, 9, 11, stride)
    garbage = [torch.full_like(k, math.nan) for _ in range(4)]
    del garbage
    _, _, grad_k, grad_v = outputs_and_grads(
        lambda *x: local_attention(*x, 1, stride, impl=impl), q, k, v, grad
    )
    read = torch.zeros(9, 11, dtype=torch.bool)
    read[::stride, ::stride] = True
    # A one-entry softmax has no key gradient at all.
    assert torch.equal(grad_k, torch.zeros_like(k))
    assert (grad_v[..., ~read] == 0).all()
    assert torch.equal(grad_v[..., read], grad.flatten(2))


@pytest.mark.parametrize('impl', IMPLS)
def test_implementations_agree_at_acmix_size(impl):
    # One stage-4-like map of an ACmix-ResNet, both implementations.
    q, k, v, grad = make_inputs(8, 16, 13, 19, 1, torch.float32)
    got = outputs_and_grads(
        lambda *x: local_attention(*x, impl=impl), q, k, v, grad
    )
    expected = outputs_and_grads(
        reference, q.double(), k.double(), v.double(), grad.double()
    )
    for a, b in zip(got, expected):
        assert (a.double() - b).abs().max().item() < 1e-5


@pytest.mark.parametrize('impl', IMPLS)
def test_gradcheck(impl):
    q, k, v, _ = make_inputs(1, 2, 4, 3, 2)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda *x: local_attention(*x, 3, 2, impl=impl), inputs
    )


@pytest.mark.parametrize('impl', IMPLS)
def test_double_backward_raises(impl):
    q, k, v, _ = make_inputs(1, 2, 4, 3, 1)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    out = local_attention(*inputs, 3, impl=impl)
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_q.sum(), q)


@pytest.mark.parametrize('impl', IMPLS)
def test_non_contiguous_inputs(impl):
    q, k, v, grad = make_inputs(2, 6, 9, 8, 1)
    # Channel-last storage and strided views, as reshapes of a fused qkv
    # projection give.
    views = [
        x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        for x in (q, k, v)
    ]
    wide = torch.cat([k, v], dim=1)[:, ::2]
    got = outputs_and_grads(
        lambda *x: local_attention(*x, impl=impl), *views, grad
    )
    expected = outputs_and_grads(reference, q, k, v, grad)
    for a, b in zip(got, expected):
        assert (a - b).abs().max().item() < 1e-10
    out = local_attention(q, wide, wide, impl=impl)
    expected = reference(q, wide.contiguous(), wide.contiguous())
    assert (out - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize('impl', IMPLS)
def test_bfloat16_computes_in_float32(impl):
    q, k, v, grad = make_inputs(2, 8, 9, 10, 2, torch.float32)
    half = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    out = local_attention(*half, 7, 2, impl=impl)
    assert out.dtype == torch.bfloat16
    out.backward(grad.bfloat16())
    assert all(x.grad.dtype == torch.bfloat16 for x in half)
    expected = reference(*(x.detach().double() for x in half), 7, 2)
    assert (out.double() - expected).abs().max().item() < 2e-2


@pytest.mark.parametrize('impl', IMPLS)
def test_saves_nothing_window_sized(impl):
    # Only q, k, v and a per-pixel statistic are kept for the backward: no
    # kernel_size ** 2 copies of anything.
    q, k, v, _ = make_inputs(3, 4, 10, 12, 1)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = local_attention(*inputs, impl=impl)
    assert out.grad_fn is not None
    limit = sum(x.numel() for x in inputs) + q.numel() // q.shape[1]
    assert sum(saved) <= limit


def test_fallback_warns_once_when_not_built(monkeypatch):
    q, k, v, _ = make_inputs(1, 3, 6, 7, 1)
    monkeypatch.setattr(module, '_ext', None)
    monkeypatch.setattr(native_module, '_warned_ops', set())
    with pytest.warns(UserWarning, match='without its compiled extension'):
        out = local_attention(q, k, v)
    assert (out - reference(q, k, v)).abs().max().item() < 1e-10
    with pytest.raises(RuntimeError, match='compiled'):
        local_attention(q, k, v, impl='native')


def test_invalid_arguments():
    q, k, v, _ = make_inputs(1, 3, 6, 7, 1)
    with pytest.raises(ValueError, match='odd'):
        local_attention(q, k, v, 4)
    with pytest.raises(ValueError, match='stride'):
        local_attention(q, k, v, 3, 0)
    with pytest.raises(ValueError, match='q must have shape'):
        local_attention(q, k, v, 3, 2)
    with pytest.raises(ValueError, match='same shape'):
        local_attention(q, k, v[..., :-1])
    with pytest.raises(ValueError, match='impl'):
        local_attention(q, k, v, impl='cuda')
    with pytest.raises(TypeError, match='floating'):
        local_attention(q.long(), k.long(), v.long())


def test_jit_trace_is_clean_and_correct():
    # FLOP counters trace the op: it appears as one registered node.
    q, k, v, _ = make_inputs(2, 3, 6, 7, 1)
    with warnings.catch_warnings():
        warnings.simplefilter('error', torch.jit.TracerWarning)
        graph, _ = torch.jit._get_trace_graph(
            lambda *x: local_attention(*x, 3), (q, k, v)
        )
        traced = torch.jit.trace(lambda *x: local_attention(*x, 3), (q, k, v))
    kinds = [n.kind() for n in graph.nodes() if n.kind().startswith('mm')]
    assert kinds == ['mmacmix::local_attention']
    q, k, v, _ = make_inputs(2, 3, 6, 7, 1, seed=1)
    expected = reference(q, k, v, 3)
    assert (traced(q, k, v) - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize('impl', IMPLS)
def test_registered_op_passes_opcheck(impl):
    # Schema, fake (meta) implementation, autograd registration and
    # AOT dispatch, checked by PyTorch's own test utility.
    q, k, v, _ = make_inputs(2, 3, 5, 6, 2)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(
        torch.ops.mmacmix.local_attention.default, (*inputs, 3, 2, impl)
    )


@pytest.mark.skipif(
    os.environ.get('CI') != 'true', reason='CI requires the compiled kernel'
)
def test_ci_has_the_compiled_kernel():
    # setup.py lets a failed build pass (users still get the loop); CI must
    # not, or the native tests above would all be skipped.
    assert module.native_available(), module._EXT_ERROR


native = importlib.import_module('mmacmix.ops.native')
ALL_ISAS = ('baseline', 'avx2', 'avx512')
ISAS = [
    pytest.param(
        isa,
        marks=pytest.mark.skipif(
            isa not in native.supported_cpu_isas(),
            reason=f'this CPU or build cannot run {isa}',
        ),
    )
    for isa in ALL_ISAS
]
# Cases for each instruction set: column blocks full, moved back and short
# at every vector width, strides 1-3, several kernel sizes, and maps smaller
# than the window.
ISA_CASES = [
    # n, d, (h, w), stride, kernel_size
    (1, 3, (9, 11), 1, 7),
    (3, 16, (12, 10), 2, 7),
    (2, 5, (5, 150), 1, 7),
    (2, 5, (4, 67), 2, 7),
    (2, 5, (6, 21), 1, 7),
    (2, 4, (11, 13), 3, 5),
    (2, 4, (11, 13), 1, 3),
    (2, 3, (2, 3), 1, 7),
    (2, 3, (1, 8), 2, 7),
]


@pytest.fixture
def cpu_isa(request):
    """Runs the compiled kernel on the instruction set of the test's
    parameter, then restores the default."""
    assert native.set_cpu_isa(request.param) == request.param
    yield request.param
    native.set_cpu_isa('auto')


@pytest.mark.parametrize('cpu_isa', ISAS, indirect=True)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_every_instruction_set_matches_reference(cpu_isa, dtype):
    for n, d, hw, stride, kernel_size in ISA_CASES:
        assert native.cpu_isa() == cpu_isa
        h, w = hw
        pad = 'reflect' if kernel_size // 2 < min(h, w) else 'index'
        assert_close_to_reference(
            'native', n, d, h, w, stride, kernel_size, dtype=dtype, pad=pad
        )


@pytest.mark.skipif(not native.supported_cpu_isas(), reason='not built')
def test_instruction_sets_agree_in_float32():
    # The float32 exp is vectorised per instruction set: all variants give
    # the same attention to within float32 rounding.
    q, k, v, grad = make_inputs(2, 16, 9, 70, 1, torch.float32)
    results = {}
    for isa in native.supported_cpu_isas():
        native.set_cpu_isa(isa)
        results[isa] = outputs_and_grads(
            lambda *x: local_attention(*x, impl='native'), q, k, v, grad
        )
    native.set_cpu_isa('auto')
    first, *others = results.values()
    for other in others:
        for a, b in zip(first, other):
            assert (a - b).abs().max().item() < 1e-5


def cpu_flags() -> set[str]:
    try:
        with open('/proc/cpuinfo') as info:
            for line in info:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(not native.supported_cpu_isas(), reason='not built')
def test_builds_every_instruction_set_the_cpu_has():
    # A build that lost a variant would silently skip its tests above.
    flags = cpu_flags()
    supported = native.supported_cpu_isas()
    assert supported[0] == 'baseline'
    if {'avx2', 'fma'} <= flags:
        assert 'avx2' in supported
    if {'avx512f', 'avx512bw', 'avx512dq', 'avx512vl'} <= flags:
        assert 'avx512' in supported
    assert native.cpu_isa() == supported[-1]


@pytest.mark.skipif(not native.supported_cpu_isas(), reason='not built')
def test_set_cpu_isa_rejects_unknown_and_unsupported_names():
    with pytest.raises(ValueError) as info:
        native.set_cpu_isa('sse9')
    assert str(info.value) == (
        "unknown instruction set 'sse9': expected auto, avx512, avx2 or "
        'baseline'
    )
    missing = [
        isa for isa in ALL_ISAS if isa not in native.supported_cpu_isas()
    ]
    for isa in missing:
        with pytest.raises(ValueError, match='supported: baseline'):
            native.set_cpu_isa(isa)
    assert native.cpu_isa() == native.supported_cpu_isas()[-1]


@pytest.mark.skipif(not native.supported_cpu_isas(), reason='not built')
@pytest.mark.parametrize(
    'value, expected',
    [('baseline', 'baseline'), (' AVX2 ', 'avx2'), ('auto', None)],
)
def test_environment_variable_picks_the_instruction_set(value, expected):
    if expected is not None and expected not in native.supported_cpu_isas():
        pytest.skip(f'this CPU or build cannot run {expected}')
    expected = expected or native.supported_cpu_isas()[-1]
    result = subprocess.run(
        [
            sys.executable,
            '-c',
            'from mmacmix.ops import native; print(native.cpu_isa())',
        ],
        env={**os.environ, native.CPU_ISA_ENV: value},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.skipif(not native.supported_cpu_isas(), reason='not built')
def test_environment_variable_with_a_bad_value_fails_at_import():
    result = subprocess.run(
        [sys.executable, '-c', 'import mmacmix.ops'],
        env={**os.environ, native.CPU_ISA_ENV: 'neon'},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ValueError: MMACMIX_CPU_ISA: unknown instruction set 'neon': "
        'expected auto, avx512, avx2 or baseline'
    )


def test_onnx_export_serves_any_size(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    pytest.importorskip('onnx')

    class Heads(torch.nn.Module):
        def forward(self, x):
            t = x.reshape(2, x.shape[1] // 2, x.shape[2], x.shape[3])
            return local_attention(t[..., ::2, ::2] * 0.5, t, t, 5, 2)

    path = tmp_path / 'attention.onnx'
    torch.onnx.export(
        Heads(),
        (torch.randn(1, 6, 9, 12),),
        str(path),
        dynamo=False,
        input_names=['x'],
        dynamic_axes={'x': {2: 'h', 3: 'w'}},
    )
    session = ort.InferenceSession(str(path))
    # Other sizes than the traced one, a map smaller than the window too.
    for shape in [(1, 6, 9, 12), (1, 6, 14, 7), (1, 6, 2, 3)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {'x': x.numpy()})
        t = x.double().reshape(2, 3, *shape[2:])
        expected = reference(t[..., ::2, ::2] * 0.5, t, t, 5, 2, 'index')
        assert got.shape == tuple(expected.shape)
        assert abs(torch.from_numpy(got).double() - expected).max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_pytorch_loop():
    q, k, v, grad = make_inputs(2, 8, 9, 10, 2)
    got = outputs_and_grads(
        lambda *x: local_attention(*x, 7, 2, impl='pytorch'),
        *(x.cuda() for x in (q, k, v, grad)),
    )
    expected = outputs_and_grads(lambda *x: reference(*x, 7, 2), q, k, v, grad)
    for a, b in zip(got, expected):
        assert (a.cpu() - b).abs().max().item() < 1e-10
