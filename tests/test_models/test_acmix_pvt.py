"""ACmixPVT: PVT v1 with ACmix attention, mmdet's PVT API and key names.

Two independent references: mmdet's own ``PyramidVisionTransformer`` (and
its converter of the original releases, ``pvt_convert``) for everything
plain, and a float64 re-implementation of one ACmix spatial-reduction
attention written from its definition (explicit softmax, explicit shifted
sums for the convolution path) for the ACmix part.
"""

import functools
import math
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from mmdet.models.backbones.pvt import PyramidVisionTransformer, pvt_convert
from model_helpers import randomise
from torch import nn

from mmacmix.analysis import analyse, official_form
from mmacmix.models import ACmixPVT, convert_pvt_to_acmix
from mmacmix.models.acmix_pvt import FUSED_MAX_HEADS, ACmixSRAttention
from mmacmix.models.converters import new_acmix_pvt_keys
from mmacmix.registry import MODELS

# mmdet's PVT with embed_dims=8: stage widths 8 * num_heads.
SMALL = dict(
    embed_dims=(8, 16, 40, 64), depths=(2, 2, 1, 1), num_heads=(1, 2, 5, 8)
)
SMALL_KWARGS = dict(arch=SMALL)
# PVT's own widths (the converter reads one head per 64 channels), few blocks.
RELEASED = dict(
    embed_dims=(64, 128, 320, 512), depths=(2, 1, 1, 1), num_heads=(1, 2, 5, 8)
)
CONVERTER = (
    Path(__file__).resolve().parents[2] / 'tools/model_converters/pvt2acmix.py'
)
ACMIX_SUFFIXES = ('fc.weight', 'fc.bias', 'dep_conv.weight', 'rate1', 'rate2')


def mmdet_pvt(arch: dict = SMALL) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(
        embed_dims=arch['embed_dims'][0],
        num_layers=list(arch['depths']),
        drop_path_rate=0.0,
    )


def release(
    dims=RELEASED['embed_dims'], depths=RELEASED['depths'], side=224, seed=0
) -> dict:
    """A checkpoint laid out like the original PVT releases, random."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, mean=0.0):
        return mean + 0.2 * torch.randn(*shape, generator=generator)

    state = {}
    channels = 3
    for stage, (c, depth) in enumerate(zip(dims, depths), start=1):
        patch, sr = (4, 2, 2, 2)[stage - 1], (8, 4, 2, 1)[stage - 1]
        hidden = (8, 8, 4, 4)[stage - 1] * c
        side //= patch
        embed = f'patch_embed{stage}.'
        state[embed + 'proj.weight'] = draw(c, channels, patch, patch)
        state[embed + 'proj.bias'] = draw(c)
        state[embed + 'norm.weight'] = draw(c, mean=1.0)
        state[embed + 'norm.bias'] = draw(c)
        tokens = side * side + (stage == len(dims))  # class token in stage 4
        state[f'pos_embed{stage}'] = draw(1, tokens, c)
        for index in range(depth):
            block = f'block{stage}.{index}.'
            shapes = {
                'norm1': [(c,)],
                'attn.q': [(c, c), (c,)],
                'attn.kv': [(2 * c, c), (2 * c,)],
                'attn.proj': [(c, c), (c,)],
                'norm2': [(c,)],
                'mlp.fc1': [(hidden, c), (hidden,)],
                'mlp.fc2': [(c, hidden), (c,)],
            }
            if sr > 1:
                shapes.update(
                    {'attn.sr': [(c, c, sr, sr), (c,)], 'attn.norm': [(c,)]}
                )
            for module, (weight, *bias) in shapes.items():
                is_norm = 'norm' in module
                state[f'{block}{module}.weight'] = draw(
                    *weight, mean=float(is_norm)
                )
                state[f'{block}{module}.bias'] = draw(*(bias or [weight]))
        channels = c
    state['norm.weight'] = draw(channels, mean=1.0)
    state['norm.bias'] = draw(channels)
    state['cls_token'] = draw(1, 1, channels)
    state['head.weight'] = draw(1000, channels)
    state['head.bias'] = draw(1000)
    return state


def convert(*args: Path) -> None:
    """Runs the converter's command line in this process (a subprocess
    would spend seconds importing torch)."""
    runpy.run_path(str(CONVERTER))['main']([str(a) for a in args])


@pytest.fixture(scope='module')
def converted_release(tmp_path_factory):
    """(release, path of its conversion through the command line)."""
    folder = tmp_path_factory.mktemp('pvt')
    source = release()
    torch.save(source, folder / 'pvt.pth')
    convert(folder / 'pvt.pth', folder / 'converted.pth')
    return source, folder / 'converted.pth'


# ---------------------------------------------------------------- reference


def reference_attention(attention: ACmixSRAttention, x, hw_shape):
    """One ACmix SR attention in float64, from its definition."""
    p = dict(attention.named_parameters())
    b, n, c = x.shape
    (h, w), sr = hw_shape, attention.sr_ratio
    heads = attention.num_heads
    dims = c // heads
    weight, bias = p['attn.in_proj_weight'], p['attn.in_proj_bias']
    q = x @ weight[:c].T + bias[:c]
    hr, wr = h, w
    source = x
    if sr > 1:
        hr, wr = math.ceil(h / sr), math.ceil(w / sr)
        padded = x.new_zeros(b, c, hr * sr, wr * sr)
        padded[..., :h, :w] = x.transpose(1, 2).reshape(b, c, h, w)
        reduced = F.conv2d(padded, p['sr.weight'], p['sr.bias'], stride=sr)
        source = F.layer_norm(
            reduced.flatten(2).transpose(1, 2),
            (c,),
            p['norm.weight'],
            p['norm.bias'],
            eps=1e-6,
        )
    kv = source @ weight[c:].T + bias[c:]
    k, v = kv[..., :c], kv[..., c:]
    # Attention: every query against the reduced keys.
    qh, kh, vh = (t.reshape(b, -1, heads, dims) for t in (q, k, v))
    logits = torch.einsum('bnhd,bmhd->bhnm', qh, kh) / math.sqrt(dims)
    mixed = torch.einsum('bhnm,bmhd->bnhd', logits.softmax(-1), vh)
    attended = mixed.reshape(b, n, c) @ p['attn.out_proj.weight'].T
    attended = attended + p['attn.out_proj.bias']
    # Convolution path: position (y, x) takes the key and value of its cell.
    rows, cols = torch.arange(h) // sr, torch.arange(w) // sr
    k_full = k.reshape(b, hr, wr, c)[:, rows][:, :, cols]
    v_full = v.reshape(b, hr, wr, c)[:, rows][:, :, cols]
    maps = torch.cat([q.reshape(b, h, w, c), k_full, v_full], -1)
    maps = maps.reshape(b, h, w, 3 * heads, dims)  # (s, head) x channel
    fc = p['fc.weight'][:, :, 0, 0]  # (9, 3 * heads)
    shifts = torch.einsum('byxgd,jg->bdjyx', maps, fc)
    shifts = shifts + p['fc.bias'].view(1, 1, 9, 1, 1)
    padded = F.pad(shifts, (1, 1, 1, 1))
    # dep_conv: output channel d * heads + o reads map j of channel d.
    kernel = p['dep_conv.weight'].view(dims, heads, 9, 3, 3)
    conv = x.new_zeros(b, dims, heads, h, w)
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, :, dy : dy + h, dx : dx + w]
            conv += torch.einsum(
                'doj,bdjyx->bdoyx', kernel[..., dy, dx], window
            )
    conv = conv.reshape(b, c, h * w).transpose(1, 2)
    return p['rate1'] * attended + p['rate2'] * conv


@pytest.mark.parametrize(
    'heads, sr, hw_shape',
    [(1, 4, (13, 10)), (2, 8, (5, 17)), (4, 2, (9, 7)), (5, 1, (6, 11))],
)
def test_attention_equals_the_float64_reference(heads, sr, hw_shape):
    # Heads 1 and 2 run the fused dense convolution path, 4 and 5 the
    # factorised one; the sizes are no multiples of sr (padding).
    attention = randomise(ACmixSRAttention(8 * heads, heads, sr)).double()
    assert attention.fused == (heads <= FUSED_MAX_HEADS)
    x = torch.randn(2, hw_shape[0] * hw_shape[1], 8 * heads).double()
    with torch.no_grad():
        actual = attention(x, hw_shape)
        expected = reference_attention(attention, x, hw_shape)
    assert (actual - expected).abs().max() < 1e-10
    assert expected.abs().max() > 0.1


# ------------------------------------------------------- plain PVT parity


def test_converted_release_computes_mmdet_pvt_of_the_same_release(
    converted_release,
):
    source, path = converted_release
    reference = mmdet_pvt(RELEASED).double().eval()
    reference.load_state_dict(pvt_convert(source), strict=True)
    model = ACmixPVT(
        arch=RELEASED,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(path), prefix='backbone.'
        ),
    )
    model.init_weights()
    model = model.double().eval()
    # 96x160: every stage a multiple of its reduction, where mmdet (which
    # drops remainders) and this model (which pads) see the same pixels.
    x = torch.randn(2, 3, 96, 160, dtype=torch.float64)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    assert len(actual) == 4
    for ours, theirs in zip(actual, expected):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-10
        assert theirs.abs().max() > 0.1


def test_final_norm_takes_the_release_norm_and_is_dropped_without_it(
    converted_release,
):
    source, _ = converted_release
    model = ACmixPVT(arch=RELEASED, final_norm=True, out_indices=(3,))
    model.load_state_dict(convert_pvt_to_acmix(source, model), strict=True)
    reference = mmdet_pvt(RELEASED).eval()
    reference.load_state_dict(pvt_convert(source), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        (actual,) = model.eval()(x)
        plain = reference(x)[3].permute(0, 2, 3, 1)
    expected = F.layer_norm(
        plain, (512,), source['norm.weight'], source['norm.bias'], eps=1e-6
    ).permute(0, 3, 1, 2)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    # An ImageNet classifier's backbone loads into a detection backbone,
    # alone or inside a detector.
    ACmixPVT(arch=RELEASED).load_state_dict(model.state_dict(), strict=True)
    detector = nn.Module()
    detector.backbone = ACmixPVT(arch=RELEASED)
    detector.load_state_dict(
        {f'backbone.{k}': v for k, v in model.state_dict().items()},
        strict=True,
    )


def test_conversion_fills_every_plain_key_and_reports_acmix_keys(
    converted_release, capsys
):
    source, path = converted_release
    saved = torch.load(path, weights_only=True)['state_dict']
    plain = pvt_convert(source)
    converted = {k.removeprefix('backbone.'): v for k, v in saved.items()}
    assert set(converted) == set(ACmixPVT(arch=RELEASED).state_dict())
    new = set(converted) - set(plain)
    # The ACmix parameters of every block, and nothing else, are new.
    blocks = {k.split('.attn.', 1)[0] for k in converted if '.attn.' in k}
    assert len(blocks) == sum(RELEASED['depths'])
    assert new == {f'{b}.attn.{s}' for b in blocks for s in ACMIX_SUFFIXES}
    assert set(new_acmix_pvt_keys(converted)) == new
    for key, value in plain.items():
        assert torch.equal(converted[key], value), key
    for key in new:
        if key.endswith('rate1'):
            assert converted[key].item() == 1.0
        elif key.endswith('rate2'):
            assert converted[key].item() == 0.0
        elif key.endswith('dep_conv.weight'):
            # One-hot shift kernels: kernel i has its 1 at (i // 3, i % 3).
            taps = converted[key].flatten(2)
            assert torch.equal(taps, torch.eye(9).expand_as(taps))


def test_cli_lists_the_new_keys_and_writes_atomically(tmp_path, capsys):
    torch.save({'model': release()}, tmp_path / 'pvt.pth')
    dst = tmp_path / 'out.pth'
    convert(tmp_path / 'pvt.pth', dst)
    printed = capsys.readouterr().out
    assert '25 ACmix tensors' in printed  # 5 blocks x 5
    assert 'layers.0.1.1.attn.dep_conv.weight' in printed
    assert f'to {dst}' in printed
    first = dst.read_bytes()
    with pytest.raises(SystemExit) as exit_info:  # no --force
        convert(tmp_path / 'pvt.pth', dst)
    assert exit_info.value.code == 1
    assert 'already exists' in capsys.readouterr().err
    assert dst.read_bytes() == first
    torch.save({'conv1.weight': torch.zeros(1)}, tmp_path / 'resnet.pth')
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path / 'resnet.pth', tmp_path / 'never.pth')
    assert exit_info.value.code == 1
    assert 'not a PVT checkpoint' in capsys.readouterr().err
    # Nothing partial or refused was left behind.
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ['out.pth', 'pvt.pth', 'resnet.pth']


def test_mmdet_layout_and_detector_checkpoints_convert_alike():
    source = release(SMALL['embed_dims'], SMALL['depths'])
    model = ACmixPVT(**SMALL_KWARGS)
    from_release = convert_pvt_to_acmix(source, model)
    detector = {
        'state_dict': {
            f'backbone.{k}': v for k, v in pvt_convert(source).items()
        }
    }
    detector['state_dict']['bbox_head.conv.weight'] = torch.zeros(1)
    from_detector = convert_pvt_to_acmix(detector, model)
    assert from_release.keys() == from_detector.keys()
    for key, value in from_release.items():
        assert torch.equal(value, from_detector[key]), key


def test_architecture_is_read_from_a_pvt_tiny_release():
    source = release(dims=(64, 128, 320, 512), depths=(2, 2, 2, 2))
    converted = convert_pvt_to_acmix(source)
    model = ACmixPVT(arch='tiny')
    expected = model.state_dict()
    assert converted.keys() == expected.keys()
    assert all(v.shape == expected[k].shape for k, v in converted.items())
    # Seeded: the new ACmix tensors are the same on every conversion.
    again = convert_pvt_to_acmix(source)
    assert all(torch.equal(v, again[k]) for k, v in converted.items())


def test_converter_errors_name_the_keys():
    source = release(SMALL['embed_dims'], SMALL['depths'])
    model = ACmixPVT(**SMALL_KWARGS)
    broken = dict(source)
    del broken['block2.1.mlp.fc2.bias']
    broken['block1.0.attn.extra.weight'] = torch.zeros(1)
    with pytest.raises(
        KeyError,
        match=r"missing keys \['layers.1.1.2.ffn.layers.3.bias'\]; unknown "
        r"keys \['layers.0.1.1.attn.extra.weight'\]",
    ):
        convert_pvt_to_acmix(broken, model)
    with pytest.raises(ValueError, match='already holds ACmix weights'):
        convert_pvt_to_acmix(model.state_dict(), model)
    with pytest.raises(KeyError, match='not a PVT checkpoint'):
        convert_pvt_to_acmix({'conv1.weight': torch.zeros(1)})
    wider = release((16, 32, 80, 128), SMALL['depths'])
    with pytest.raises(ValueError, match='shape'):
        convert_pvt_to_acmix(wider, model)


# ------------------------------------------------------------------- API


def test_parameters_are_plain_pvt_plus_acmix_per_block():
    for arch, depths in (('tiny', (2, 2, 2, 2)), ('small', (3, 4, 6, 3))):
        with torch.device('meta'):
            model = ACmixPVT(arch=arch)
        plain = PyramidVisionTransformer(num_layers=list(depths))
        count = sum(p.numel() for p in model.parameters())
        # Per block: fc (9 x 3N + 9), dep_conv (C x 9 x 3 x 3), two rates.
        acmix = sum(
            depth * (27 * heads + 9 + 81 * dims + 2)
            for depth, heads, dims in zip(
                depths, (1, 2, 5, 8), (64, 128, 320, 512)
            )
        )
        assert count == sum(p.numel() for p in plain.parameters()) + acmix
        assert model.out_channels == [64, 128, 320, 512]


def test_official_form_flops_are_plain_pvt_plus_the_convolution_path():
    # The paper's count: fc (27 C) and shift convolution (81 C) per
    # position and block, on top of mmdet's PVT (linear and conv layers).
    x = torch.randn(1, 3, 64, 96)
    with official_form():
        ours = analyse(ACmixPVT(**SMALL_KWARGS), (x,))['by_operator']
    plain = analyse(mmdet_pvt(), (x,))['by_operator']
    path = sum(
        depth * 108 * dims * (64 // stride) * (96 // stride)
        for depth, dims, stride in zip(
            SMALL['depths'], SMALL['embed_dims'], (4, 8, 16, 32)
        )
    )
    dense = ('conv', 'linear')
    assert sum(ours[k] for k in dense) == sum(plain[k] for k in dense) + path


def test_arch_names_and_errors():
    assert ACmixPVT.arch_zoo['s'] is ACmixPVT.arch_zoo['small']
    assert MODELS.get('ACmixPVT') is ACmixPVT
    with pytest.raises(ValueError, match=r"'s', 'small', 't', 'tiny'"):
        ACmixPVT(arch='medium')
    with pytest.raises(ValueError, match='depths.*embed_dims.*num_heads'):
        ACmixPVT(arch=dict(embed_dims=(8,), depths=(2,)))
    with pytest.raises(ValueError, match=r'sr_ratios \(8, 4\) must have one'):
        ACmixPVT(arch=SMALL, sr_ratios=(8, 4))
    # out_indices, frozen_stages and the input: test_backbone_contract.py.


def test_pretrained_loading_is_strict(converted_release, tmp_path):
    _, path = converted_release
    saved = torch.load(path, weights_only=True)
    saved['state_dict']['backbone.layers.0.1.1.attn.extra'] = torch.zeros(1)
    torch.save(saved, tmp_path / 'extra.pth')
    model = ACmixPVT(
        arch=RELEASED,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=str(tmp_path / 'extra.pth'),
            prefix='backbone.',
        ),
    )
    with pytest.raises(KeyError, match='layers.0.1.1.attn.extra'):
        model.init_weights()


@settings(max_examples=10, deadline=None)
@given(
    height=st.integers(1, 90),
    width=st.integers(1, 90),
    batch=st.integers(1, 2),
)
def test_any_size_gives_ceil_sizes_and_per_image_results(height, width, batch):
    model = _property_model()
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        outs = model(x)
        alone = model(x[-1:])
    for stage, (out, single) in enumerate(zip(outs, alone)):
        stride = 4 * 2**stage
        assert out.shape == (
            batch,
            SMALL['embed_dims'][stage],
            math.ceil(height / stride),
            math.ceil(width / stride),
        )
        assert torch.isfinite(out).all()
        # Each image is computed on its own (padding is per map).
        torch.testing.assert_close(out[-1:], single, rtol=1e-4, atol=1e-5)


@functools.cache
def _property_model() -> ACmixPVT:
    return randomise(ACmixPVT(**SMALL_KWARGS)).eval()
