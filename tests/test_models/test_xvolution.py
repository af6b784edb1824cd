"""X-volution: the operator, its deployed form, the ResNet, the tools."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope, init_default_scope
from mmengine.runner.checkpoint import load_state_dict

from mmacmix.deploy import deploy_options, reparameterize
from mmacmix.models import (
    XVolution,
    XVolutionResNet,
    convert_resnet_to_xvolution,
)
from mmacmix.models import xvolution as xvolution_module
from mmacmix.models.xvolution import pixel_shift_attention, shift_products

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / 'tools/model_converters/resnet2xvolution.py'
CONFIGS = REPO / 'configs/xvolution_resnet'
TRAINING_KEYS = {
    'conv.weight',
    'pssa.weight',
    *(
        f'{norm}.{name}'
        for norm in ('conv_bn', 'pssa_bn')
        for name in (
            'weight',
            'bias',
            'running_mean',
            'running_var',
            'num_batches_tracked',
        )
    ),
}
DEPLOY_KEYS = {'weight', 'dynamic_weight', 'bias'}


def randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Gives every batch norm non-trivial statistics and affine terms."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            size = norm.num_features
            with torch.no_grad():
                norm.running_mean.copy_(torch.randn(size, generator=generator))
                norm.running_var.copy_(
                    torch.rand(size, generator=generator) * 1.5 + 0.5
                )
                norm.weight.copy_(torch.randn(size, generator=generator))
                norm.bias.copy_(torch.randn(size, generator=generator))


def reference(op: XVolution, x: torch.Tensor) -> torch.Tensor:
    """The training form in eval mode, written pixel by pixel.

    conv: sum over taps of W[o, c, t] x[c, p + L t]; PSSA: sum over taps
    (the 8 neighbours at distance L and the pixel itself) and channels of
    A[o, c * 9 + t] x[c, p] x[c, p + L t]; zero outside the map; each
    branch through its batch norm (eval), then summed.
    """
    _, channels, height, width = x.shape
    step, dist = op.stride, op.dilation
    out_h, out_w = -(-height // step), -(-width // step)
    kernel = op.conv.weight
    pssa = op.pssa.weight.reshape(op.out_channels, channels, 9)
    conv = x.new_zeros(x.shape[0], op.out_channels, out_h, out_w)
    attn = torch.zeros_like(conv)
    for i in range(out_h):
        for j in range(out_w):
            y, xx = i * step, j * step
            centre = x[:, :, y, xx]
            for tap in range(9):
                dy, dx = tap // 3 - 1, tap % 3 - 1
                yy, xs = y + dy * dist, xx + dx * dist
                if not (0 <= yy < height and 0 <= xs < width):
                    continue
                other = x[:, :, yy, xs]
                conv[:, :, i, j] += other @ kernel[:, :, dy + 1, dx + 1].T
                attn[:, :, i, j] += (centre * other) @ pssa[:, :, tap].T
    if op.conv.bias is not None:
        conv = conv + op.conv.bias.reshape(1, -1, 1, 1)
    return eval_norm(op.conv_bn, conv) + eval_norm(op.pssa_bn, attn)


def eval_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A batch norm in eval mode, written out with its running statistics."""
    return F.batch_norm(
        x,
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        False,
        0.0,
        norm.eps,
    )


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Random norm scales and shifts, then running statistics measured on
    ``x``: non-trivial, yet the magnitudes a trained network has (random
    statistics blow up through stacked quadratic PSSA branches)."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            size = norm.num_features
            norm.momentum = None  # running statistics = those of x
            with torch.no_grad():
                norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    with torch.no_grad():
        model.train()(x)
    model.eval()


def random_op(dtype=torch.float32, **kwargs) -> XVolution:
    torch.manual_seed(0)
    op = XVolution(**{'in_channels': 5, 'out_channels': 4, **kwargs})
    if kwargs.get('attention') == 'global':
        # Logits of order one: the softmax is neither flat nor one-hot.
        with torch.no_grad():
            op.attn.qkv.weight.mul_(4)
    randomize_norms(op)
    return op.to(dtype).eval()


@pytest.mark.parametrize(
    'stride, dilation, size',
    [(1, 1, (6, 7)), (2, 1, (7, 5)), (2, 2, (5, 8)), (1, 3, (4, 4))],
)
def test_training_form_equals_the_pixelwise_reference(stride, dilation, size):
    op = random_op(
        torch.float64,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        bias=True,
    )
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op(x), reference(op, x))


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('dilation', [1, 2])
@pytest.mark.parametrize('size', [(1, 1), (2, 3), (7, 7), (13, 6)])
def test_output_shape_is_that_of_a_padded_3x3_conv(stride, dilation, size):
    op = XVolution(3, 6, 3, stride, dilation, dilation)
    conv = torch.nn.Conv2d(3, 6, 3, stride, dilation, dilation)
    x = torch.randn(2, 3, *size)
    out = op(x)
    assert out.shape == conv(x).shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    'dtype, tolerance', [(torch.float32, 1e-5), (torch.float64, 1e-10)]
)
@pytest.mark.parametrize(
    'stride, dilation, bias', [(1, 1, False), (2, 1, True), (2, 2, False)]
)
def test_deployed_form_equals_the_training_form_in_eval(
    dtype, tolerance, stride, dilation, bias
):
    op = random_op(
        dtype, stride=stride, padding=dilation, dilation=dilation, bias=bias
    )
    x = torch.randn(2, 5, 9, 11, dtype=dtype)
    with torch.no_grad():
        before = op(x)
        op.switch_to_deploy()
        after = op(x)
    error = (before - after).abs().max() / before.abs().max()
    assert error < tolerance


def test_deployed_form_has_the_same_input_gradient_in_float64():
    op = random_op(torch.float64, stride=2)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    grads = []
    for deploy in (False, True):
        if deploy:
            op.switch_to_deploy()
        (
            op(x) * torch.arange(4.0, dtype=x.dtype).reshape(1, 4, 1, 1)
        ).sum().backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


def test_switch_to_deploy_removes_the_training_parameters():
    op = random_op()
    assert set(op.state_dict()) == TRAINING_KEYS
    op.switch_to_deploy()
    state = op.state_dict()
    assert set(state) == DEPLOY_KEYS
    assert (
        state['weight'].shape
        == state['dynamic_weight'].shape
        == (
            4,
            5,
            3,
            3,
        )
    )
    assert not any(hasattr(op, m) for m in ('conv', 'conv_bn', 'pssa'))
    op.switch_to_deploy()  # a second call changes nothing
    assert set(op.state_dict()) == DEPLOY_KEYS

    built = XVolution(5, 4, deploy=True)
    built.load_state_dict(state, strict=True)
    x = torch.randn(1, 5, 6, 6)
    with torch.no_grad():
        assert torch.equal(built(x), op(x))


def test_deployed_form_is_a_conv_with_a_content_dependent_kernel():
    op = random_op(torch.float64)
    op.switch_to_deploy()
    x = torch.randn(1, 5, 4, 4, dtype=torch.float64)
    cols = F.unfold(x, 3, padding=1).reshape(5, 9, 16)  # (C, tap, pixel)
    centre = x.reshape(5, 1, 16)
    kernel = op.weight.reshape(4, 5, 9, 1) + (
        op.dynamic_weight.reshape(4, 5, 9, 1) * centre
    )  # (O, C, tap, pixel): one kernel per output pixel
    expected = (kernel * cols).sum((1, 2)) + op.bias[:, None]
    with torch.no_grad():
        torch.testing.assert_close(op(x).reshape(4, 16), expected)


def test_every_parameter_receives_a_gradient_in_both_forms():
    for deploy in (False, True):
        op = XVolution(5, 4, stride=2, deploy=deploy)
        if deploy:
            torch.nn.init.normal_(op.dynamic_weight)
        op(torch.randn(2, 5, 7, 7)).square().mean().backward()
        for name, param in op.named_parameters():
            assert param.grad is not None and param.grad.any(), name


@pytest.mark.parametrize('path', ['compiled', 'pytorch'])
@pytest.mark.parametrize(
    'stride, dilation, size',
    [(1, 1, (7, 9)), (2, 1, (9, 6)), (2, 2, (8, 7)), (1, 3, (10, 5))],
)
def test_tiles_and_blocks_equal_the_whole_map_forward_and_backward(
    path, stride, dilation, size, monkeypatch
):
    # Tiles of one row and blocks of one channel (the compiled kernel,
    # which then runs its backward in several phases), or blocks of one row
    # (the PyTorch path): every border is crossed. The whole map through
    # autograd (stacked products, one matrix product) is the independent
    # reference, in float64.
    if path == 'compiled':
        if xvolution_module.native_ops is None:
            pytest.skip('mmacmix was built without its compiled kernels')
        monkeypatch.setattr(xvolution_module, 'TILE_POSITIONS', 1)
        monkeypatch.setattr(xvolution_module, 'BLOCK_BYTES', 1)
    else:
        monkeypatch.setattr(xvolution_module, 'native_ops', None)
        monkeypatch.setattr(xvolution_module, 'BLOCK_ELEMENTS', 1)
        x = torch.zeros(2, 3, *size)
        assert (
            len(xvolution_module._ProductRows(x, dilation, stride).blocks) > 2
        )
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 27, dtype=torch.float64, requires_grad=True)
    products = shift_products(x, dilation, stride)
    expected = torch.einsum('ok,bkhw->bohw', weight, products)
    out_grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), out_grad)
    out = pixel_shift_attention(x, weight, dilation, stride)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, (x, weight), out_grad)
    for grad, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-12, atol=1e-12)
    # Only the gradient asked for.
    (grad_x,) = torch.autograd.grad(
        pixel_shift_attention(x, weight.detach(), dilation, stride),
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
            summed = pixel_shift_attention(
                x, weight, dilation, stride, base.clone()
            )
        torch.testing.assert_close(
            summed, expected.detach() + base, rtol=1e-12, atol=1e-12
        )


def test_compiled_pssa_at_a_real_width_in_float64_and_float32():
    # The default tiling at a ResNet width: several tiles, and the threads'
    # partial weight gradients summed. The whole map through autograd in
    # float64 is the reference.
    if xvolution_module.native_ops is None:
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


def test_compiled_pssa_on_several_threads_under_no_grad():
    # Worker threads do not share the caller's grad mode: parameters that
    # require grad must still be usable there (eval of a trained module).
    if xvolution_module.native_ops is None:
        pytest.skip('mmacmix was built without its compiled kernels')
    op = random_op(torch.float64, in_channels=8, out_channels=6)
    x = torch.randn(2, 8, 40, 9, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        with torch.no_grad():
            torch.testing.assert_close(op(x), reference(op, x))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize('stride, dilation', [(1, 1), (2, 2), (1, 3)])
def test_compiled_pssa_splits_small_maps_by_output_channels(stride, dilation):
    # A map smaller than a default tile per thread: with 4 threads the
    # forward runs 2 tiles x 2 halves of the 37 output channels (18 + 19),
    # alone and added in place. The whole map in float64 is the reference.
    if xvolution_module.native_ops is None:
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


def global_attention_reference(op: XVolution, x: torch.Tensor) -> torch.Tensor:
    """X-volution (SA) in eval mode, from its definition: the conv branch of
    :func:`reference` plus, through its batch norm, the output projection
    of softmax(q k / sqrt(d)) v per head, queries at every stride-th pixel,
    keys and values at every pixel."""
    attn = op.attn
    channels = op.out_channels
    heads = attn.num_heads
    dims = channels // heads
    weight = attn.qkv.weight.flatten(1)
    qkv = (
        torch.einsum('oc,bchw->bohw', weight, x) + attn.qkv.bias[:, None, None]
    )
    q, k, v = qkv.split(channels, dim=1)
    q = q[:, :, :: op.stride, :: op.stride]
    out_h, out_w = q.shape[-2:]
    q = q.reshape(x.shape[0], heads, dims, -1)
    k = k.reshape(x.shape[0], heads, dims, -1)
    v = v.reshape(x.shape[0], heads, dims, -1)
    logits = torch.einsum('bhdq,bhdk->bhqk', q, k) / dims**0.5
    mixed = torch.einsum('bhqk,bhdk->bhdq', logits.softmax(-1), v)
    mixed = mixed.reshape(x.shape[0], channels, out_h, out_w)
    projected = (
        torch.einsum('oc,bchw->bohw', attn.proj.weight.flatten(1), mixed)
        + attn.proj.bias[:, None, None]
    )
    conv = F.conv2d(
        x,
        op.conv.weight,
        op.conv.bias,
        op.stride,
        op.dilation,
        op.dilation,
    )

    return eval_norm(op.conv_bn, conv) + eval_norm(op.attn_bn, projected)


@pytest.mark.parametrize(
    'stride, dilation, size',
    [(1, 1, (1, 1)), (1, 1, (6, 7)), (2, 1, (7, 5)), (2, 2, (9, 4))],
)
def test_global_attention_equals_its_definition_in_float64(
    stride, dilation, size
):
    op = random_op(
        torch.float64,
        stride=stride,
        padding=dilation,
        dilation=dilation,
        attention='global',
        num_heads=2,
        out_channels=6,
    )
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    with torch.no_grad():
        out = op(x)
        torch.testing.assert_close(out, global_attention_reference(op, x))
    conv = torch.nn.Conv2d(5, 6, 3, stride, dilation, dilation)
    assert out.shape == conv(x.float()).shape


def test_global_attention_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    op = XVolution(5, 8, stride=2, attention='global', num_heads=2)
    op(torch.randn(2, 5, 7, 6)).square().mean().backward()
    names = {name for name, _ in op.named_parameters()}
    assert {'attn.qkv.weight', 'attn.proj.bias', 'attn_bn.weight'} <= names
    for name, param in op.named_parameters():
        assert param.grad is not None and param.grad.any(), name


def test_global_attention_cannot_be_deployed():
    op = XVolution(4, 4, attention='global')
    with pytest.raises(ValueError, match="attention='global' has no deployed"):
        op.switch_to_deploy()
    assert not op.deploy and hasattr(op, 'attn')
    with pytest.raises(ValueError, match="attention='global' has no deployed"):
        XVolution(4, 4, attention='global', deploy=True)
    with pytest.raises(ValueError, match='divisible'):
        XVolution(4, 6, attention='global', num_heads=4)
    with pytest.raises(ValueError, match=r"\('pssa', 'global'\)"):
        XVolution(4, 4, attention='local')
    model = XVolutionResNet(depth=18, attention='global', num_heads=2)
    with pytest.raises(ValueError, match="attention='global' has no deployed"):
        model.switch_to_deploy()
    with pytest.raises(ValueError, match="attention='global' has no deployed"):
        XVolutionResNet(depth=18, attention='global', deploy=True)


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(kernel_size=5, padding=2), 'kernel_size=5'),
        (dict(padding=0), 'padding=0'),
        (dict(padding=1, dilation=2), 'padding=1'),
        (dict(groups=2), 'groups=2'),
        (dict(dilation=0, padding=0), 'dilation=0'),
        (dict(stride=(1, 2)), 'stride'),
        (dict(norm_cfg=dict(type='GN', num_groups=2)), 'GroupNorm'),
    ],
)
def test_unsupported_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XVolution(4, 4, **kwargs)


def test_wrong_input_is_rejected_with_its_shape():
    with pytest.raises(ValueError, match=r'\(1, 3, 8, 8\)'):
        XVolution(4, 4)(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('stride, dilation', [(1, 1), (2, 1), (1, 2)])
def test_build_conv_layer_makes_a_drop_in_xvolution(scope, stride, dilation):
    with DefaultScope.overwrite_default_scope(scope):
        layer = build_conv_layer(
            dict(type='mmacmix.XVolution'),
            64,
            64,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
        )
        with pytest.raises(ValueError, match='groups=4'):
            build_conv_layer(
                dict(type='mmacmix.XVolution'), 64, 64, 3, groups=4
            )
    assert isinstance(layer, XVolution)
    assert (layer.stride, layer.dilation) == (stride, dilation)
    conv = torch.nn.Conv2d(64, 64, 3, stride, dilation, dilation)
    x = torch.randn(1, 64, 9, 10)
    assert layer(x).shape == conv(x).shape


def test_a_plain_conv_state_dict_fills_the_conv_branch():
    from mmdet.registry import MODELS as MMDET_MODELS

    with DefaultScope.overwrite_default_scope('mmdet'):
        plain = MMDET_MODELS.build(dict(type='ResNet', depth=50))
        model = MMDET_MODELS.build(
            dict(
                type='ResNet',
                depth=50,
                dcn=dict(type='mmacmix.XVolution'),
                stage_with_dcn=(False, False, True, False),
            )
        )
    imagenet = plain.state_dict()
    load_state_dict(model, imagenet, strict=False)  # as init_cfg does
    op = model.layer3[1].conv2
    assert isinstance(op, XVolution)
    assert torch.equal(op.conv.weight, imagenet['layer3.1.conv2.weight'])
    result = model.load_state_dict(imagenet, strict=False)
    assert not result.unexpected_keys
    # (torch's BN fills a missing num_batches_tracked by itself.)
    expected = {k for k in TRAINING_KEYS if 'num_batches' not in k}
    missing = {k.rpartition('conv2.')[2] for k in result.missing_keys}
    assert missing == expected - {'conv.weight'}


@pytest.mark.parametrize(
    'depth, resnet, ops',
    [
        (18, 11_176_512, [(128, 256)] + [(256, 256)] * 3),
        (34, 21_284_672, [(128, 256)] + [(256, 256)] * 11),
        (50, 23_508_032, [(256, 256)] * 6),
        (101, 42_500_160, [(256, 256)] * 23),
    ],
)
def test_parameter_count(depth, resnet, ops):
    # torchvision's ResNet without classifier (its resnet18/34/50/101 have
    # 11_689_512 / 21_797_672 / 25_557_032 / 44_549_160 parameters, minus
    # the fc's 513_000 or 2_049_000); each X-volution (stage 3)
    # adds its PSSA weighted sum (C_out x 9 C_in) and one norm (2 C_out):
    # its conv branch and norm are the ResNet's conv and following norm.
    extra = sum(9 * cin * cout + 2 * cout for cin, cout in ops)
    model = XVolutionResNet(depth=depth)
    assert sum(p.numel() for p in model.parameters()) == resnet + extra
    plain = XVolutionResNet(depth=depth, xvolution_stages=(False,) * 4)
    assert sum(p.numel() for p in plain.parameters()) == resnet


def test_xvolution_replaces_the_3x3_convs_of_the_chosen_stages():
    model = XVolutionResNet(
        depth=18, xvolution_stages=(True, False, False, True)
    )
    ops = {n for n, m in model.named_modules() if isinstance(m, XVolution)}
    assert ops == {
        f'layer{s}.{b}.conv{c}' for s in (1, 4) for b in (0, 1) for c in (1, 2)
    }
    op = model.layer4[0].conv1
    assert (op.in_channels, op.out_channels, op.stride) == (256, 512, 2)
    assert op.pssa.weight.shape == (512, 9 * 256, 1, 1)
    bottleneck = XVolutionResNet(depth=50)
    assert isinstance(bottleneck.layer3[0].conv2, XVolution)
    assert bottleneck.layer3[0].conv2.stride == 2
    assert not isinstance(bottleneck.layer2[0].conv2, XVolution)
    with pytest.raises(ValueError, match='one flag per stage'):
        XVolutionResNet(depth=18, xvolution_stages=(True,))
    with pytest.raises(ValueError, match=r'\[18, 34, 50, 101\]'):
        XVolutionResNet(depth=26)


@pytest.mark.parametrize('size', [(64, 64), (75, 53)])
def test_outputs_are_nchw_at_strides_4_to_32(size):
    model = XVolutionResNet(depth=50, out_indices=(0, 2, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    for out, channels, stride in zip(
        outs, (256, 1024, 2048), (4, 16, 32), strict=True
    ):
        assert out.shape == (
            1,
            channels,
            -(-size[0] // stride),
            -(-size[1] // stride),
        )
        assert torch.isfinite(out).all()


def test_frozen_stages_and_norm_eval_reach_the_xvolution_norms():
    model = XVolutionResNet(depth=18, frozen_stages=3, norm_eval=True)
    model.train()
    for name, param in model.named_parameters():
        frozen = name.startswith(
            ('conv1', 'bn1', 'layer1', 'layer2', 'layer3')
        )
        assert param.requires_grad is not frozen, name
    assert not model.layer3[0].conv1.pssa_bn.training
    model.switch_to_deploy()
    model.train()
    assert not model.layer3[0].conv1.weight.requires_grad
    assert model.layer4[0].conv1.weight.requires_grad


def test_every_backbone_parameter_receives_a_gradient():
    model = XVolutionResNet(
        depth=18,
        xvolution_stages=(True, True, True, True),
        zero_init_residual=False,
    )
    model.init_weights()
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in outs).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.any(), name


def test_with_cp_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = XVolutionResNet(depth=18, out_indices=(3,))
    checkpointed = XVolutionResNet(depth=18, out_indices=(3,), with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for model in (plain, checkpointed):
        outs.append(model(x)[0])
        outs[-1].sum().backward()
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(
        plain.parameters(), checkpointed.parameters(), strict=True
    ):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_backbone_deploys_and_reloads_strictly():
    torch.manual_seed(0)
    model = XVolutionResNet(
        depth=18, xvolution_stages=(False, True, True, False)
    )
    x = torch.randn(1, 3, 45, 38)
    calibrate(model, x)
    with torch.no_grad():
        before = model(x)
        model.switch_to_deploy()
        after = model(x)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() / a.abs().max() < 1e-5
    keys = set(model.state_dict())
    assert 'layer3.0.conv1.dynamic_weight' in keys
    assert not any('pssa' in k or 'conv_bn' in k for k in keys)
    deployed = XVolutionResNet(
        depth=18, xvolution_stages=(False, True, True, False), deploy=True
    )
    deployed.load_state_dict(model.state_dict(), strict=True)


def torchvision_resnet(
    depth: int, seed: int = 0
) -> tuple[dict, torch.nn.Module]:
    """A torchvision-style ResNet state dict (with ``fc``) and the model."""
    torch.manual_seed(seed)
    plain = XVolutionResNet(depth=depth, xvolution_stages=(False,) * 4)
    calibrate(plain, torch.randn(2, 3, 32, 32))
    state = dict(plain.state_dict())
    width = plain.out_channels[-1]
    state['fc.weight'] = torch.randn(1000, width)
    state['fc.bias'] = torch.randn(1000)
    return state, plain.eval()


@pytest.fixture(scope='module')
def resnet18() -> tuple[dict, torch.nn.Module]:
    """A torchvision-style ResNet-18 (copy the state dict to change it)."""
    return torchvision_resnet(18)


@pytest.mark.parametrize(
    'layout, depth', [('torchvision', 50), ('mmpretrain', 18), ('ddp', 18)]
)
def test_converted_backbone_computes_the_source_resnet(
    layout, depth, resnet18
):
    state, plain = torchvision_resnet(50) if depth == 50 else resnet18
    state = dict(state)
    if layout == 'mmpretrain':
        head = {
            'head.fc.weight': state.pop('fc.weight'),
            'head.fc.bias': state.pop('fc.bias'),
        }
        checkpoint = {
            'meta': {'mmpretrain_version': '1.2.0'},
            'state_dict': {
                **{f'backbone.{k}': v for k, v in state.items()},
                **head,
            },
        }
    elif layout == 'ddp':
        checkpoint = {
            'state_dict': {f'module.{k}': v for k, v in state.items()}
        }
    else:
        checkpoint = state
    converted = convert_resnet_to_xvolution(checkpoint)
    model = XVolutionResNet(depth=depth)
    model.load_state_dict(converted, strict=True)
    model.eval()
    op = model.layer3[1].conv2
    assert torch.equal(op.conv.weight, state['layer3.1.conv2.weight'])
    assert torch.equal(
        op.conv_bn.running_var, state['layer3.1.bn2.running_var']
    )
    assert isinstance(model.layer3[1].bn2, torch.nn.Identity)
    assert not op.pssa_bn.weight.any()  # the PSSA branch starts off
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_converted_global_attention_backbone_computes_the_source_resnet(
    resnet18,
):
    state, plain = resnet18
    converted = convert_resnet_to_xvolution(state, attention='global')
    assert 'layer3.0.conv1.attn.qkv.weight' in converted
    assert not converted['layer3.0.conv1.attn_bn.weight'].any()
    model = XVolutionResNet(depth=18, attention='global')
    model.load_state_dict(converted, strict=True)
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), model.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_conversion_is_deterministic_and_leaves_the_global_rng_alone(
    resnet18,
):
    state = resnet18[0]
    torch.manual_seed(123)
    first = convert_resnet_to_xvolution(state)
    draw = torch.rand(1)
    torch.manual_seed(123)
    second = convert_resnet_to_xvolution(state)
    assert torch.equal(draw, torch.rand(1))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_converter_names_missing_unknown_keys_and_wrong_depths(resnet18):
    state = dict(resnet18[0])
    state.pop('layer2.1.bn2.running_mean')
    state['layer3.1.extra'] = torch.zeros(1)
    with pytest.raises(KeyError, match='layer2.1.bn2.running_mean.*extra'):
        convert_resnet_to_xvolution(state)
    state = resnet18[0]
    with pytest.raises(ValueError, match='ResNet-34.*ResNet-18'):
        convert_resnet_to_xvolution(state, depth=34)
    # mmseg's ResNetV1c (deep stem) is not a torchvision-style ResNet.
    v1c = {
        k: v for k, v in state.items() if not k.startswith(('conv1', 'bn1'))
    }
    v1c['stem.0.weight'] = torch.zeros(32, 3, 3, 3)
    with pytest.raises(KeyError, match='conv1.weight.*stem.0.weight'):
        convert_resnet_to_xvolution(v1c)
    with pytest.raises(ValueError, match='known depth'):
        convert_resnet_to_xvolution({'layer1.0.conv1.weight': torch.zeros(1)})


def test_converter_cli_writes_a_checkpoint_that_loads_strictly(
    tmp_path, resnet18
):
    state, plain = resnet18
    src, dst = tmp_path / 'resnet18.pth', tmp_path / 'xvolution.pth'
    torch.save(state, src)
    command = [sys.executable, str(CONVERTER), str(src), str(dst)]
    subprocess.run(
        [*command, '--depth', '18'], check=True, cwd=REPO, capture_output=True
    )
    saved = torch.load(dst, weights_only=True)['state_dict']
    assert all(k.startswith('backbone.') for k in saved)
    loaded = XVolutionResNet(
        depth=18,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(dst), prefix='backbone.'
        ),
    )
    loaded.init_weights()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), loaded.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'name, options',
    [
        (
            'retinanet_xvolution-r50_fpn_1x_coco.py',
            ['model.backbone.deploy=True'],
        ),
        (
            '../drop_in/retinanet_r50-xvolution-c4_fpn_1x_coco.py',
            ['model.backbone.dcn.deploy=True'],
        ),
    ],
)
def test_deploy_options_are_found_in_configs(name, options):
    model_cfg = Config.fromfile(str(CONFIGS / name)).model
    assert deploy_options(model_cfg) == options


def test_reparameterized_detector_predicts_the_same(tmp_path):
    from mmdet.structures import DetDataSample

    config = str(CONFIGS / 'retinanet_xvolution-r50_fpn_1x_coco.py')
    cfg = Config.fromfile(config)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    calibrate(model.backbone, torch.randn(2, 3, 64, 64))
    checkpoint, out = tmp_path / 'trained.pth', tmp_path / 'deployed.pth'
    torch.save(
        {'meta': {'epoch': 12}, 'state_dict': model.state_dict()}, checkpoint
    )
    options = reparameterize(config, str(checkpoint), str(out))
    assert options == ['model.backbone.deploy=True']

    deployed_cfg = Config.fromfile(config)
    deployed_cfg.merge_from_dict({'model.backbone.deploy': True})
    deployed = MODELS.build(deployed_cfg.model)
    saved = torch.load(out, weights_only=False)
    assert saved['meta']['epoch'] == 12 and saved['meta']['deploy']
    deployed.load_state_dict(saved['state_dict'], strict=True)
    assert not any('pssa' in k for k in saved['state_dict'])

    images = torch.randn(1, 3, 64, 64)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0)
        )
    )
    results = []
    for net in (model.eval(), deployed.eval()):
        with torch.no_grad():
            tensors = net(images, mode='tensor')
            results.append(
                (
                    tensors,
                    net(images, [sample.clone()], mode='predict')[
                        0
                    ].pred_instances,
                )
            )
    (tensors, trained), (deployed_tensors, deployed_pred) = results
    for level_a, level_b in zip(tensors, deployed_tensors, strict=True):
        for a, b in zip(level_a, level_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(trained) == len(deployed_pred) > 0
    torch.testing.assert_close(
        trained.scores, deployed_pred.scores, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        trained.bboxes, deployed_pred.bboxes, rtol=1e-4, atol=1e-3
    )
    assert torch.equal(trained.labels, deployed_pred.labels)


def test_reparameterize_refuses_a_model_without_xvolution(tmp_path):
    config = REPO / 'configs/drop_in/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py'
    trained = tmp_path / 'trained.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, trained)
    with pytest.raises(ValueError, match='has no X-volution'):
        reparameterize(str(config), str(trained), str(tmp_path / 'out.pth'))
    assert list(tmp_path.iterdir()) == [trained]
