"""X-volution, the operator: training form against a pixelwise reference,
its deployed form, X-volution (SA), the drop-in into mmdet's ResNet."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import load_state_dict
from model_helpers import (
    DEPLOY_KEYS,
    TRAINING_KEYS,
    eval_norm,
    random_op,
    reference,
)

from mmacmix.models import XVolution, XVolutionResNet
from mmacmix.ops import pixel_shift as pixel_shift_module


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


def test_compiled_pssa_on_several_threads_under_no_grad():
    # Worker threads do not share the caller's grad mode: parameters that
    # require grad must still be usable there (eval of a trained module).
    if not pixel_shift_module.native_available():
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


@pytest.mark.parametrize('deploy', [False, True])
def test_compiles_with_fullgraph_and_computes_the_same(deploy):
    # The PSSA is one registered op: Dynamo traces the whole operator,
    # training form with its backward, or the deployed form.
    op = random_op(stride=2)
    if deploy:
        op.switch_to_deploy()
    else:
        op.train()
    twin = copy.deepcopy(op)
    compiled = torch.compile(twin, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 5, 9, 7, requires_grad=not deploy)
    results = []
    for module in (op, compiled):
        with torch.set_grad_enabled(not deploy):
            out = module(x)
        grads = []
        if not deploy:
            grads = torch.autograd.grad(
                out.square().sum(), (x, *module.parameters())
            )
        results.append((out, *grads))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
