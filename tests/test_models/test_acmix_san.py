"""ACmixSAN: architecture, the patchwise attention against a float64
reference, the mmdet backbone API, any input size."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mmacmix.models import ACmixSAN
from mmacmix.models.acmix_san import (
    PatchwiseSelfAttention,
    patch_aggregation,
)

# One block a stage, 3x3 windows: the layout at a fraction of the cost.
SMALL = dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 3, 3, 3, 3))
WIDTHS = (64, 256, 512, 1024, 2048)
# hszhao/SAN's patchwise models, with their 1000-class classifier.
PUBLISHED_SAN_PARAMS = {10: 11.8e6, 15: 16.2e6, 19: 20.5e6}


def san_parameters(arch: int, with_acmix: bool) -> int:
    """SAN's parameter count from its description (no classifier)."""
    settings = ACmixSAN.arch_zoo[arch]
    total = 3 * 64 + 2 * 64  # conv_in, bn_in
    previous = 64
    for width, blocks, k in zip(
        WIDTHS, settings['blocks'], settings['kernel_sizes']
    ):
        rel, mid = width // 16, width // 4
        groups, taps = mid // 8, k * k
        block = (
            2 * width  # bn1
            + 2 * (width * rel + rel)  # conv1, conv2 (q, k)
            + width * mid
            + mid  # conv3 (v)
            + 2 * rel * (taps + 1)  # conv_w: BN over query + key patch
            + rel * (taps + 1) * groups  # 1x1, no bias
            + 2 * groups  # BN
            + groups * taps * groups
            + taps * groups  # 1x1 to the window weights
            + 2 * mid  # bn2
            + mid * width
            + width  # conv
        )
        if with_acmix:
            # fc: 6 maps (q, k, 4 pieces of v) -> 9; dep_conv; two rates.
            block += 9 * 6 + mid * 9 * 9 + 2
        total += previous * width + 2 * width + blocks * block
        previous = width
    return total


@pytest.mark.parametrize('arch', [10, 15, 19])
def test_parameter_counts_follow_san(arch):
    for with_acmix in (False, True):
        model = ACmixSAN(arch=arch, with_acmix=with_acmix)
        count = sum(p.numel() for p in model.parameters())
        assert count == san_parameters(arch, with_acmix)
    # Plain, with SAN's classifier: the published patchwise SAN, to 0.1M.
    plain_with_head = san_parameters(arch, False) + 2048 * 1000 + 1000
    assert abs(plain_with_head - PUBLISHED_SAN_PARAMS[arch]) < 0.05e6


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match=r'\[10, 15, 19\]'):
        ACmixSAN(arch=26)
    with pytest.raises(ValueError, match='odd kernel sizes'):
        ACmixSAN(arch=dict(blocks=(1,) * 5, kernel_sizes=(3, 4, 3, 3, 3)))
    with pytest.raises(ValueError, match='five entries each'):
        ACmixSAN(arch=dict(blocks=(1,) * 4, kernel_sizes=(3,) * 5))
    # out_indices, frozen_stages and the input: test_backbone_contract.py.


def test_init_keeps_acmix_shift_kernels_and_rates():
    model = ACmixSAN(arch=SMALL)
    model.init_weights()
    last_convs = [
        block.conv for i in range(5) for block in getattr(model, f'layer{i}')
    ]
    assert len(last_convs) == 5
    assert not any(c.weight.any() or c.bias.any() for c in last_convs)
    acmix = model.layer2[0].sam.acmix
    assert acmix.rate1.item() == 0.5 and acmix.rate2.item() == 0.5
    one_hot = torch.eye(9).view(1, 9, 3, 3).expand_as(acmix.dep_conv.weight)
    assert torch.equal(acmix.dep_conv.weight, one_hot)


def reference_attention(sam: PatchwiseSelfAttention, x):
    """SAN's patchwise SAM with ACmix written out independently: unfold
    over a reflection pad (as hszhao/SAN), the convolution path as an
    explicit sum of zero-padded shifts."""
    b, _, h, w = x.shape
    k, pad = sam.kernel_size, sam.kernel_size // 2
    q = F.conv2d(x, sam.conv1.weight, sam.conv1.bias)
    key = F.conv2d(x, sam.conv2.weight, sam.conv2.bias)
    v = F.conv2d(x, sam.conv3.weight, sam.conv3.bias)

    def unfold(t):
        return F.unfold(F.pad(t, [pad] * 4, mode='reflect'), k)

    patch = torch.cat([q.flatten(2), unfold(key)], 1).unsqueeze(2)
    weights = sam.conv_w(patch).view(b, sam.groups, k * k, h * w)
    channels = v.shape[1]
    windows = unfold(v).view(b, channels // sam.groups, sam.groups, k * k, -1)
    attention = (weights.unsqueeze(1) * windows).sum(3).view(b, -1, h, w)

    acmix, width = sam.acmix, q.shape[1]
    maps = torch.cat([q, key, v], 1).view(b, -1, width, h, w)
    shifts = torch.einsum('jm,bmdyx->bjdyx', acmix.fc.weight[:, :, 0, 0], maps)
    padded = F.pad(shifts, [1, 1, 1, 1])
    # Output channel d * E + e of the grouped conv reads group d.
    kernels = acmix.dep_conv.weight.view(width, -1, 9, 3, 3)
    conv = 0
    for dy in range(3):
        for dx in range(3):
            window = padded[..., dy : dy + h, dx : dx + w]
            conv = conv + torch.einsum(
                'dej,bjdyx->bdeyx', kernels[..., dy, dx], window
            )
    conv = conv.reshape(b, channels, h, w)
    return acmix.rate1 * attention + acmix.rate2 * conv


def test_attention_with_acmix_matches_a_float64_reference():
    torch.manual_seed(0)
    sam = PatchwiseSelfAttention(24, 4, 16, share_channels=4, kernel_size=5)
    sam = sam.double().eval()
    with torch.no_grad():
        for param in sam.parameters():
            param.normal_(0, 0.5)
        for module in sam.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(sam)
    x = torch.randn(2, 24, 9, 11, dtype=torch.float64)
    results = []
    for module in (sam, reference):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        forward = module if module is sam else reference_attention
        args = (xi,) if module is sam else (module, xi)
        out = forward(*args)
        out.mul(
            torch.linspace(-1, 1, out.numel()).view_as(out)
        ).sum().backward()
        grads = [p.grad for p in module.parameters()]
        results.append((out.detach(), xi.grad, grads))
    (out, x_grad, grads), (ref, ref_x_grad, ref_grads) = results
    assert torch.allclose(out, ref, atol=1e-10)
    assert torch.allclose(x_grad, ref_x_grad, atol=1e-10)
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.allclose(grad, ref_grad, atol=1e-10)


def reflect(index: int, size: int) -> int:
    """Reflection without edge repeat, applied until inside the axis."""
    if size == 1:
        return 0
    while not 0 <= index < size:
        index = -index if index < 0 else 2 * (size - 1) - index
    return index


@pytest.mark.parametrize('size', [(1, 1), (2, 3), (4, 2)])
def test_aggregation_on_maps_smaller_than_the_window(size):
    torch.manual_seed(0)
    h, w = size
    values = torch.randn(1, 4, h, w, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 2, 25, h, w, dtype=torch.float64)
    weights.requires_grad_()
    out = patch_aggregation(values, weights, 5)
    expected = torch.zeros_like(out)
    for c in range(4):
        for i in range(h):
            for j in range(w):
                for t in range(25):
                    y, x = (
                        reflect(i + t // 5 - 2, h),
                        reflect(j + t % 5 - 2, w),
                    )
                    expected[0, c, i, j] += (
                        weights[0, c % 2, t, i, j] * values[0, c, y, x]
                    )
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda v, wt: patch_aggregation(v, wt, 5), (values, weights)
    )


def test_aggregation_rejects_mismatched_weights():
    with pytest.raises(ValueError, match=r'\(B, G, 9, H, W\)'):
        patch_aggregation(
            torch.zeros(1, 6, 4, 4), torch.zeros(1, 4, 9, 4, 4), 3
        )


_small_model = None


def small_model() -> ACmixSAN:
    global _small_model
    if _small_model is None:
        torch.manual_seed(0)
        _small_model = ACmixSAN(arch=SMALL).eval()
    return _small_model


@settings(max_examples=6, deadline=None)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 48),
    width=st.integers(1, 48),
)
def test_any_input_size_gives_ceil_sized_outputs(batch, height, width):
    with torch.no_grad():
        outs = small_model()(torch.randn(batch, 3, height, width))
    for out, stride in zip(outs, (4, 8, 16, 32)):
        assert out.shape[0] == batch
        assert out.shape[2:] == (-(-height // stride), -(-width // stride))
        assert torch.isfinite(out).all()


def test_flop_count_includes_the_aggregation():
    from mmacmix.analysis.flops import analyse

    sam = PatchwiseSelfAttention(24, 4, 16, share_channels=4, kernel_size=5)
    result = analyse(sam, (torch.randn(2, 24, 9, 11),))
    counted = result['by_operator']
    # One multiply-add per output element and window position.
    assert counted['patch_aggregation'] == 2 * 16 * 9 * 11 * 25
    assert counted['baddbmm'] == 2 * 9 * 11 * 24 * (4 + 4 + 16)
    assert not any('patch_aggregation' in op for op in result['uncounted'])
