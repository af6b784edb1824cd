"""Mixed precision: every op and backbone trains under bfloat16 autocast.

Each case runs one forward and backward pass in float32 and one under
``torch.autocast('cpu', dtype=torch.bfloat16)`` (the backward pass outside
the context, as with AMP) from the same weights and input, and compares the
outputs, the input gradient and all parameter gradients (as one vector) by
relative L2 error ``|a - b| / |b|``.

Tolerances. bfloat16 keeps 8 significant bits: a rounding changes a value
by at most 2^-9 (0.2 %) and a rounded tensor is off by about that in L2.
Autocast rounds the inputs and outputs of every convolution and matrix
product, so an operator (q/k/v projection, products, output) collects a
few such roundings: ``OP_TOLERANCE`` = 2 % allows about ten (measured: 0.3
to 0.5 %). Whole backbones chain 20 to 50 of them; batch norm in training
mode divides by batch statistics of small maps and, in the backward pass,
subtracts nearly equal terms, which amplifies the relative error of the
gradients (plain ResNets measured 23 to 28 % here). So a ResNet backbone is
held to a plain-convolution control built and run identically: its errors
may be at most ``CONTROL_FACTOR`` = 2 times the control's (measured 1.0 to
1.35x), and its feature maps must stay within 5 % (measured 0.5 to 3 %).
ACmix-Swin uses LayerNorm, which autocast keeps in float32 like the
softmax, and stays within ``SWIN_TOLERANCE`` = 3 % everywhere (measured 0.3
to 0.9 %), with a gradient pointing the same way (cosine similarity above
0.97). ACmix-PVT, also LayerNorm-based, is held to the same (measured 0.5
to 1.2 %).
"""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmacmix.models import (
    ACmix,
    ACmixPVT,
    ACmixResNet,
    ACmixSAN,
    XVolutionResNet,
)
from mmacmix.models.acmix_san import PatchwiseSelfAttention
from mmacmix.models.acmix_swin import (
    ACmixSwinTransformer,
    ACmixWindowAttention,
    shifted_window_mask,
)
from mmacmix.models.resnet import PluggableResNet
from mmacmix.ops import local_attention

xvolution = pytest.importorskip('mmacmix.models.xvolution')

OP_TOLERANCE = 2e-2
SWIN_TOLERANCE = 3e-2
CONTROL_FACTOR = 2.0
MIN_COSINE = 0.97


@dataclass
class Pass:
    outputs: list[Tensor]
    input_grad: Tensor
    param_grad: Tensor


def run(model: nn.Module, x: Tensor, bf16: bool, seed: int = 0) -> Pass:
    """One forward and backward pass on a copy of ``model``."""
    model = copy.deepcopy(model)
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        outs = model(x)
    outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
    # A fixed random projection of every output, so that the gradients
    # are those of a generic loss (a plain sum would cancel by symmetry).
    generator = torch.Generator().manual_seed(seed)
    loss = sum(
        (out.float() * torch.randn(out.shape, generator=generator)).mean()
        for out in outs
    )
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for out in outs:
        assert torch.isfinite(out).all()
    return Pass(
        outputs=[out.detach().float() for out in outs],
        input_grad=x.grad.float(),
        param_grad=torch.cat(
            [p.grad.float().flatten() for p in model.parameters()]
        ),
    )


def relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def errors(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Relative errors of bfloat16 autocast against float32."""
    full, half = run(model, x, bf16=False), run(model, x, bf16=True)
    assert torch.isfinite(half.input_grad).all()
    assert torch.isfinite(half.param_grad).all()
    result = {
        f'out{i}': relative(a, b)
        for i, (a, b) in enumerate(zip(half.outputs, full.outputs))
    }
    result['input_grad'] = relative(half.input_grad, full.input_grad)
    result['param_grad'] = relative(half.param_grad, full.param_grad)
    result['cosine'] = F.cosine_similarity(
        half.param_grad, full.param_grad, dim=0
    ).item()
    # bfloat16 was really used: float32 would agree to ~1e-7.
    assert result['out0'] > 1e-4, result
    return result


def randomised(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    return module


@pytest.mark.parametrize(
    'name, make',
    [
        ('acmix', lambda: randomised(ACmix(16, 16, num_heads=2))),
        ('acmix_stride2', lambda: ACmix(16, 32, stride=2, num_heads=4)),
        (
            'acmix_san_attention',
            lambda: randomised(
                PatchwiseSelfAttention(16, 4, 16, 4, kernel_size=5)
            ),
        ),
        ('xvolution', lambda: xvolution.XVolution(16, 16)),
        (
            'xvolution_stride2_dilation2',
            lambda: xvolution.XVolution(
                16, 24, stride=2, dilation=2, padding=2
            ),
        ),
        (
            'xvolution_deployed',
            lambda: xvolution.XVolution(16, 16, deploy=True),
        ),
    ],
)
def test_ops_under_bfloat16_autocast(name, make):
    torch.manual_seed(0)
    op = make().train()
    result = errors(op, torch.randn(2, 16, 13, 11))
    for key, value in result.items():
        if key != 'cosine':
            assert value < OP_TOLERANCE, (name, result)


class WindowAttention(nn.Module):
    """ACmix window attention on an image-shaped map, shifted windows."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = ACmixWindowAttention(16, num_heads=2, window_size=4)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C), sides multiples of 4
        mask = shifted_window_mask(x.shape[1], x.shape[2], 4, 2, x)
        return self.attn(x, 4, mask).permute(0, 3, 1, 2)


def test_acmix_window_attention_under_bfloat16_autocast():
    torch.manual_seed(0)
    attention = WindowAttention()
    with torch.no_grad():
        attention.attn.relative_position_bias_table.normal_()
    result = errors(attention, torch.randn(2, 16, 8, 12))
    for key, value in result.items():
        if key != 'cosine':
            assert value < OP_TOLERANCE, result


def test_local_attention_takes_bfloat16_tensors():
    # The compiled kernel computes in float32; bfloat16 inputs are cast
    # for it and the result (and gradients) come back in bfloat16.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 10) for _ in range(3))
    exact = local_attention(q, k, v, 7, 1)
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = local_attention(*half, 7, 1)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in half)
    assert relative(out.float(), exact) < OP_TOLERANCE


class PlainResNet(PluggableResNet):
    """The control: ACmix-ResNet-26's layout with plain 3x3 convs."""

    arch_settings = ACmixResNet.arch_settings


def backbone_pair(family: str) -> tuple[nn.Module, nn.Module]:
    """A backbone and its plain-convolution control, same other weights."""
    if family == 'acmix_resnet':
        model, control = ACmixResNet(depth=26), PlainResNet(depth=26)
    else:
        model = XVolutionResNet(depth=18, xvolution_stages=(True,) * 4)
        control = XVolutionResNet(depth=18, xvolution_stages=(False,) * 4)
    for net in (model, control):
        torch.manual_seed(0)
        net.init_weights()
        # Residual branches at a fifth of the shortcut (not zero, so the
        # ops under test get gradients): the scale of a trained ResNet's
        # branches, and it keeps a random 20-layer stack well conditioned.
        for block in net.modules():
            # Any residual block (basic, bottleneck) names its last norm.
            if isinstance(getattr(type(block), 'last_norm', None), property):
                last = block.last_norm
                if isinstance(last, xvolution.XVolution):
                    # Its branch norms end the block: scale both.
                    last = [last.conv_bn, last.pssa_bn]
                for norm in last if isinstance(last, list) else [last]:
                    nn.init.constant_(norm.weight, 0.2)
    shared = {
        k: v
        for k, v in control.state_dict().items()
        if k in model.state_dict() and v.shape == model.state_dict()[k].shape
    }
    model.load_state_dict(shared, strict=False)
    return model.train(), control.train()


def san_pair() -> tuple[nn.Module, nn.Module]:
    """ACmix-SAN and its control, the plain patchwise SAN: the same
    network without ACmix's convolution path, same other weights."""
    arch = dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 3, 3, 3, 3))
    pair = []
    for with_acmix in (True, False):
        net = ACmixSAN(arch, with_acmix=with_acmix, zero_init_residual=False)
        torch.manual_seed(0)
        net.init_weights()
        with torch.no_grad():  # residual branches at a fifth, as above
            for block in net.modules():
                if hasattr(block, 'sam'):
                    block.conv.weight.mul_(0.2)
        pair.append(net)
    model, control = pair
    model.load_state_dict(control.state_dict(), strict=False)
    return model.train(), control.train()


@pytest.mark.parametrize(
    'family', ['acmix_resnet', 'xvolution_resnet', 'acmix_san']
)
def test_resnet_backbones_under_bfloat16_autocast(family):
    model, control = (
        san_pair() if family == 'acmix_san' else backbone_pair(family)
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours, theirs = errors(model, x), errors(control, x)
    for key in ours:
        if key == 'cosine':
            continue  # follows from the gradient's error, checked below
        # Feature maps stay close in absolute terms too: within 5 %, or
        # the control's error where the plain network itself is further
        # off (SAN's stage 4: 5.9 % plain, 4.9 % with ACmix).
        if key.startswith('out'):
            assert ours[key] < max(0.05, theirs[key]), (key, ours)
        assert ours[key] < CONTROL_FACTOR * theirs[key] + 1e-3, (
            key,
            ours,
            theirs,
        )


def test_acmix_swin_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = ACmixSwinTransformer(
        arch=dict(embed_dims=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2)),
        drop_path_rate=0.0,
    ).train()
    # 64x64: stages 1-2 pad and shift their windows, 3-4 use smaller ones.
    result = errors(model, torch.randn(2, 3, 64, 64))
    for key, value in result.items():
        if key == 'cosine':
            assert value > MIN_COSINE, result
        else:
            assert value < SWIN_TOLERANCE, (key, result)


def test_acmix_pvt_under_bfloat16_autocast():
    # LayerNorm throughout, like Swin: the same tolerances. 61x45 pads every
    # stage; stages 1-2 fuse the convolution path, 3-4 factorise it.
    torch.manual_seed(0)
    model = ACmixPVT(
        arch=dict(
            embed_dims=(16, 32, 40, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 5, 8),
        ),
        drop_path_rate=0.0,
    ).train()
    result = errors(model, torch.randn(2, 3, 61, 45))
    for key, value in result.items():
        if key == 'cosine':
            assert value > MIN_COSINE, result
        else:
            assert value < SWIN_TOLERANCE, (key, result)


def _attention_input_dtypes(
    model: nn.Module, x: Tensor, device: str, dtype: torch.dtype, monkeypatch
) -> set:
    """Dtypes and ranks of the attention inputs during one autocast
    forward: the local-attention op (ACmix-ResNet) or SDPA (ACmix-Swin)."""
    import mmacmix.models.acmix as acmix_module
    import mmacmix.models.acmix_swin as swin_module

    seen = set()

    def spy(function):
        def record(*args, **kwargs):
            seen.update((t.dtype, t.dim()) for t in args[:3])
            return function(*args, **kwargs)

        return record

    monkeypatch.setattr(
        acmix_module, 'local_attention', spy(acmix_module.local_attention)
    )
    sdpa = spy(F.scaled_dot_product_attention)
    monkeypatch.setattr(swin_module.F, 'scaled_dot_product_attention', sdpa)
    with torch.autocast(device, dtype=dtype):
        model.to(device)(x.to(device))
    return seen


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no CUDA device'
)
HALF_PRECISION_CASES = [
    ('cpu', torch.bfloat16),
    pytest.param('cuda', torch.float16, marks=needs_cuda),
    pytest.param('cuda', torch.bfloat16, marks=needs_cuda),
]


@pytest.mark.parametrize('device, dtype', HALF_PRECISION_CASES)
def test_attention_stays_in_half_precision(device, dtype, monkeypatch):
    # Nothing upcasts q, k and v before the attention: the local-attention
    # op gets half tensors (its kernels accumulate in float32), and Swin's
    # window attention gets 4-d (batch, heads, tokens, dims) half tensors,
    # the form CUDA's fused attention kernels take.
    torch.manual_seed(0)
    x = torch.randn(1, 3, 40, 56)
    resnet = ACmixResNet(depth=26, out_indices=(0,))
    seen = _attention_input_dtypes(resnet, x, device, dtype, monkeypatch)
    assert seen == {(dtype, 4)}
    swin = ACmixSwinTransformer(arch='tiny', out_indices=(0,))
    monkeypatch.undo()
    seen = _attention_input_dtypes(swin, x, device, dtype, monkeypatch)
    assert seen == {(dtype, 4)}
