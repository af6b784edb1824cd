"""The conv-form ACmix op against a plain reference of the official maths."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmacmix.models import ACmix, ACmixBase


def reference_acmix(op: ACmix, x: torch.Tensor) -> torch.Tensor:
    """The official formulation, written plainly: unfold the reflection-padded
    keys, values and position codes over 7x7 windows, with logits
    ``q . (k + pe_q - pe_k)``; then the fc + grouped-conv path."""
    s, heads, dim = op.stride, op.num_heads, op.head_dims
    q, k, v = op.conv1(x), op.conv2(x), op.conv3(x)
    b, c, h, w = q.shape
    h_out, w_out = math.ceil(h / s), math.ceil(w / s)
    xs = torch.linspace(-1, 1, w, dtype=x.dtype).expand(h, w)
    ys = torch.linspace(-1, 1, h, dtype=x.dtype)[:, None].expand(h, w)
    pe = op.conv_p(torch.stack([xs, ys])[None])

    def windows(t):
        padded = F.pad(t, (3, 3, 3, 3), mode='reflect')
        return F.unfold(padded, 7, stride=s).view(
            t.shape[0], dim, 49, h_out, w_out
        )

    q_att = q.view(b * heads, dim, h, w)[..., ::s, ::s] * dim**-0.5
    pe_q = pe[..., ::s, ::s]
    logits = (
        q_att.unsqueeze(2)
        * (
            windows(k.view(b * heads, dim, h, w))
            + pe_q.unsqueeze(2)
            - windows(pe)
        )
    ).sum(1)
    weights = logits.softmax(1)
    out_att = (
        weights.unsqueeze(1) * windows(v.view(b * heads, dim, h, w))
    ).sum(2)
    out_att = out_att.reshape(b, c, h_out, w_out)

    stacked = torch.cat([t.view(b, heads, dim, h * w) for t in (q, k, v)], 1)
    shifted = op.fc(stacked).permute(0, 2, 1, 3).reshape(b, -1, h, w)
    out_conv = F.conv2d(
        shifted, op.dep_conv.weight, stride=s, padding=1, groups=dim
    )
    return op.rate1 * out_att + op.rate2 * out_conv


def randomised(op: ACmix) -> ACmix:
    """Gives every parameter a random value so that no term hides."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in op.parameters():
            param.normal_(0, 0.5)
    return op


def test_state_dict_matches_the_official_op():
    op = ACmix(64, 64, stride=2)
    shapes = {k: tuple(v.shape) for k, v in op.state_dict().items()}
    assert shapes == {
        'rate1': (1,),
        'rate2': (1,),
        'conv1.weight': (64, 64, 1, 1),
        'conv1.bias': (64,),
        'conv2.weight': (64, 64, 1, 1),
        'conv2.bias': (64,),
        'conv3.weight': (64, 64, 1, 1),
        'conv3.bias': (64,),
        'conv_p.weight': (16, 2, 1, 1),
        'conv_p.bias': (16,),
        'fc.weight': (9, 12, 1, 1),
        'dep_conv.weight': (64, 9, 3, 3),
    }


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [(8, 10), (12, 12), (9, 11), (7, 13)])
def test_forward_equals_reference_in_float64(stride, size):
    op = randomised(ACmix(6, 8, stride=stride, num_heads=2)).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    out = op(x)
    expected = reference_acmix(op, x)
    assert out.shape == (
        2,
        8,
        math.ceil(size[0] / stride),
        math.ceil(size[1] / stride),
    )
    assert (out - expected).abs().max() < 1e-10


@pytest.mark.parametrize('stride', [1, 2])
def test_gradients_equal_reference_in_float64(stride):
    op = randomised(ACmix(4, 8, stride=stride, num_heads=2)).double()
    x = torch.randn(1, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(1, 8, *op(x).shape[-2:], dtype=torch.float64)
    params = [x, *op.parameters()]
    ours = torch.autograd.grad((op(x) * grad_out).sum(), params)
    theirs = torch.autograd.grad(
        (reference_acmix(op, x) * grad_out).sum(), params
    )
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [(9, 10), (8, 7)])
def test_float32_forward_and_gradients_match_reference(stride, size):
    # Our float32 op against the float64 reference of the same weights:
    # what is left is float32 rounding, which folding the scales and rates
    # into the weights must keep small. 1e-5 absolute for values of order
    # one; larger values (the rates' gradients sum over every pixel, about
    # 130 here, where one float32 step is 7.6e-6) get it relative.
    op = randomised(ACmix(4, 8, stride=stride, num_heads=2))
    x = torch.randn(1, 4, *size, requires_grad=True)
    out = op(x)
    grad_out = torch.randn(out.shape)
    ours = [
        out,
        *torch.autograd.grad((out * grad_out).sum(), [x, *op.parameters()]),
    ]
    op64 = copy.deepcopy(op).double()
    x64 = x.detach().double().requires_grad_()
    expected = reference_acmix(op64, x64)
    theirs = [
        expected,
        *torch.autograd.grad(
            (expected * grad_out.double()).sum(), [x64, *op64.parameters()]
        ),
    ]
    for a, b in zip(ours, theirs):
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max() < 1e-5 * scale


@pytest.mark.parametrize('fc_bias', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
def test_fused_conv_path_equals_projection_then_conv_path(fc_bias, stride):
    core = ACmixBase(8, 2, fc_bias=fc_bias, stride=stride)
    core = randomised(core).double()
    weight = torch.randn(24, 5, dtype=torch.float64)
    bias = torch.randn(24, dtype=torch.float64)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    two_step = core.conv_path(F.conv2d(x, weight[..., None, None], bias))
    assert (core.fused_conv_path(x, weight, bias) - two_step).abs().max() < (
        1e-10
    )


def test_odd_sizes_at_stride_two_match_a_strided_3x3_conv():
    op = ACmix(8, 8, stride=2, num_heads=2)
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
    for size in [(5, 7), (13, 9), (1, 1), (2, 3)]:
        x = torch.randn(1, 8, *size)
        assert op(x).shape == conv(x).shape


def test_conv_path_starts_as_a_zero_padded_shift_and_sum():
    op = ACmix(8, 8, num_heads=2)
    dim, heads = op.head_dims, op.num_heads
    maps = torch.randn(1, 9 * dim, 6, 7)  # channel d * 9 + i
    out = op.dep_conv(maps)
    padded = F.pad(maps, (1, 1, 1, 1))
    for channel in range(op.out_channels):
        group = channel // heads
        expected = sum(
            padded[0, group * 9 + i, i // 3 : i // 3 + 6, i % 3 : i % 3 + 7]
            for i in range(9)
        )
        assert torch.equal(out[0, channel], expected)
    assert op.rate1.item() == op.rate2.item() == 0.5


def test_init_weights_keeps_the_shift_kernels():
    op = ACmix(8, 8, num_heads=2, init_cfg=dict(type='Normal', layer='Conv2d'))
    op.init_weights()
    one_hot = torch.eye(9).view(1, 9, 3, 3).expand(8, 9, 3, 3)
    assert torch.equal(op.dep_conv.weight, one_hot)
    assert op.rate1.item() == 0.5


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(kernel_size=5), 'kernel_size=3'),
        (dict(dilation=2), 'dilation=1'),
        (dict(padding=0), 'padding=1'),
        (dict(groups=2), 'groups=1'),
        (dict(bias=True), 'bias=False'),
        (dict(stride=3), 'stride 1 or 2'),
        (dict(num_heads=3), 'divisible by num_heads'),
        (dict(attn_kernel_size=4), 'odd'),
    ],
)
def test_unsupported_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ACmix(8, 8, **kwargs)


def test_wrong_input_is_rejected_with_its_shape():
    op = ACmix(8, 8, num_heads=2)
    with pytest.raises(ValueError, match=r'\(B, 8, H, W\).*\(1, 3, 5, 5\)'):
        op(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match='got shape'):
        op(torch.randn(8, 5, 5))


def test_every_parameter_receives_a_gradient():
    op = ACmix(8, 8, stride=2, num_heads=2)
    op(torch.randn(2, 8, 9, 9)).square().sum().backward()
    for name, param in op.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
