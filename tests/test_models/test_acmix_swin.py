"""ACmixSwinTransformer: the official model's function, mmdet's Swin API.

The reference below is a plain re-implementation of the official
``SwinTransformer_acmix`` (LeapLabTHU/ACmix on GitHub,
``Swin-Transformer/models/swin_transformer_acmix.py``), written from the
facts of that code, not copied from it: a fixed 224x224 input, masks
precomputed per block, token-shaped tensors and the official parameter and
buffer names, so its state dict has the layout of a released checkpoint.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmacmix.cli import convert_cli
from mmacmix.models import ACmixSwinTransformer, convert_acmix_swin
from mmacmix.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / 'tools/model_converters/acmix_swin2mmacmix.py'
SMALL = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


class RefAttention(nn.Module):
    """Official ACmix window attention on a ``(B, H, W, C)`` rolled map."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        side = 2 * window - 1
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(side * side, heads)
        )
        cells = [(y, x) for y in range(window) for x in range(window)]
        index = [
            [
                (a[0] - b[0] + window - 1) * side + a[1] - b[1] + window - 1
                for b in cells
            ]
            for a in cells
        ]
        self.register_buffer('relative_position_index', torch.tensor(index))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Conv2d(3 * heads, 9, 1)
        self.dep_conv = nn.Conv2d(
            9 * dim // heads,
            dim,
            3,
            padding=1,
            groups=dim // heads,
            bias=False,
        )
        self.rate1 = nn.Parameter(torch.full((1,), 0.5))
        self.rate2 = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x, mask):
        b, h, w, c = x.shape
        d, n, win = c // self.heads, self.window**2, self.window
        qkv = self.qkv(x)
        # Convolution path: fc over the 3 * heads maps (index s * heads + h)
        # of each head channel, then dep_conv fed channel d * 9 + j.
        maps = qkv.view(b, h, w, 3 * self.heads, d)
        shifts = torch.einsum(
            'byxgd,jg->bdjyx', maps, self.fc.weight[:, :, 0, 0]
        )
        shifts = shifts + self.fc.bias.view(1, 1, 9, 1, 1)
        conv = self.dep_conv(shifts.reshape(b, d * 9, h, w))
        # Window attention.
        windows = qkv.view(b, h // win, win, w // win, win, 3 * c)
        windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, n, 3 * c)
        q, k, v = windows.view(-1, n, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        logits = (q * d**-0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)
        ].view(n, n, -1)
        logits = logits + bias.permute(2, 0, 1)
        if mask is not None:
            logits = logits.view(b, -1, self.heads, n, n) + mask[None, :, None]
            logits = logits.view(-1, self.heads, n, n)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
        out = self.proj(out).view(b, h // win, w // win, win, win, c)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return self.rate1 * out + self.rate2 * conv.permute(0, 2, 3, 1)


class RefBlock(nn.Module):
    def __init__(self, dim, heads, resolution, window, shift):
        super().__init__()
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.resolution, self.shift = resolution, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RefAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        mask = None
        if shift:
            h, w = resolution
            label = torch.zeros(h, w)
            bands = (
                slice(0, -window),
                slice(-window, -shift),
                slice(-shift, None),
            )
            count = 0
            for rows in bands:
                for cols in bands:
                    label[rows, cols] = count
                    count += 1
            label = label.view(h // window, window, w // window, window)
            label = label.permute(0, 2, 1, 3).reshape(-1, window * window)
            mask = (label[:, None, :] != label[:, :, None]).float() * -100.0
        self.register_buffer('attn_mask', mask)

    def forward(self, x):
        h, w = self.resolution
        y = self.norm1(x).view(x.shape[0], h, w, -1)
        s = self.shift
        y = self.attn(torch.roll(y, (-s, -s), (1, 2)), self.attn_mask)
        x = x + torch.roll(y, (s, s), (1, 2)).reshape(x.shape)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefMerging(nn.Module):
    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        x = x.view(x.shape[0], *self.resolution, -1)
        x = torch.cat(
            [
                x[:, 0::2, 0::2],
                x[:, 1::2, 0::2],
                x[:, 0::2, 1::2],
                x[:, 1::2, 1::2],
            ],
            -1,
        )
        return self.reduction(self.norm(x.flatten(1, 2)))


class RefSwinACmix(nn.Module):
    """The official classifier, for a fixed 224x224 input."""

    def __init__(self, embed_dims, depths, num_heads, window=7):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dims, 4, stride=4)
        self.patch_embed.norm = nn.LayerNorm(embed_dims)
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim, side = embed_dims * 2**i, 56 // 2**i
            layer = nn.Module()
            layer.blocks = nn.ModuleList(
                [
                    RefBlock(
                        dim, heads, (side, side), window, j % 2 * window // 2
                    )
                    for j in range(depth)
                ]
            )
            layer.downsample = (
                RefMerging(dim, (side, side)) if i < len(depths) - 1 else None
            )
            self.layers.append(layer)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1000)

    def forward_features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = self.patch_embed.norm(x)
        for layer in self.layers:
            for block in layer.blocks:
                x = block(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.norm(x).mean(1)


def randomise(model: nn.Module) -> nn.Module:
    """Gives every parameter a distinct random value (no one-hot kernel,
    no unit norm), so that any permutation of channels would show."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if 'norm' in name and name.endswith('weight'):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif 'rate' in name:
                param.uniform_(0.3, 0.9)
            elif 'relative_position_bias_table' in name:
                param.normal_(0, 0.5)
            else:
                param.normal_(0, 0.1)
    return model


def released_checkpoint(reference: nn.Module) -> dict:
    """A file laid out like the released ones (config: a yacs node there,
    which test_cli_reads_a_release_whose_config_class_is_absent pickles)."""
    config = dict(
        MODEL=dict(
            TYPE='swin_acmix', NAME='acmix_swin_tiny_patch4_window7_224'
        )
    )
    return {
        'model': reference.state_dict(),
        'optimizer': {'state': {}},
        'max_accuracy': 81.9,
        'epoch': 299,
        'config': config,
    }


@pytest.fixture(scope='module')
def reference() -> RefSwinACmix:
    return randomise(RefSwinACmix(**SMALL)).eval()


@pytest.fixture(scope='module')
def converted(reference, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('swin')
    src, dst = folder / 'official.pth', folder / 'mmacmix.pth'
    torch.save(released_checkpoint(reference), src)
    subprocess.run(
        [sys.executable, CONVERTER, src, dst],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return dst


def pretrained(path: Path, **kwargs) -> ACmixSwinTransformer:
    model = ACmixSwinTransformer(
        arch=SMALL,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(path), prefix='backbone.'
        ),
        **kwargs,
    )
    model.init_weights()
    return model


@pytest.mark.parametrize(
    'arch, expected',
    [
        ('tiny', 27_879_372),
        ('small', 49_574_544),
    ],
)
def test_parameter_count_equals_the_official_model_without_head(
    arch, expected
):
    # The official swin_transformer_acmix.py models have 28.65M (T) and
    # 50.35M (S) parameters; these counts plus the classifier (768 * 1000
    # + 1000 = 769_000) and the final norm (2 * 768 = 1_536) give
    # 28_649_908 and 50_345_080.
    with torch.device('meta'):
        model = ACmixSwinTransformer(arch=arch)
    count = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.startswith('norm')
    )
    assert count == expected
    assert model.out_channels == [96, 192, 384, 768]


def test_arch_names_and_errors():
    assert (
        ACmixSwinTransformer.arch_zoo['s']
        is (ACmixSwinTransformer.arch_zoo['small'])
    )
    assert MODELS.get('ACmixSwinTransformer') is ACmixSwinTransformer
    with pytest.raises(ValueError, match=r"'s', 'small', 't', 'tiny'"):
        ACmixSwinTransformer(arch='base')
    with pytest.raises(ValueError, match='depths.*embed_dims.*num_heads'):
        ACmixSwinTransformer(arch=dict(embed_dims=32, depths=(2, 2)))
    with pytest.raises(ValueError, match='out_indices'):
        ACmixSwinTransformer(arch=SMALL, out_indices=(4,))


def test_converted_weights_compute_the_official_features(reference, converted):
    saved = torch.load(converted, weights_only=True)['state_dict']
    model = pretrained(converted).eval()
    # Identity output norms for the stages the official model has none for.
    for stage in range(3):
        assert torch.equal(
            saved[f'backbone.norm{stage}.weight'], torch.ones(32 * 2**stage)
        )
        assert not saved[f'backbone.norm{stage}.bias'].any()
    assert set(saved) == {f'backbone.{k}' for k in model.state_dict()}
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}

    x = torch.randn(2, 3, 224, 224, requires_grad=True)
    expected = reference.forward_features(x)
    actual = model(x)[-1].mean((2, 3))
    assert (actual - expected).abs().max() < 1e-4

    # The backward pass agrees too (attention bias, mask, conv path).
    expected.square().sum().backward()
    reference_grad = x.grad.clone()
    x.grad = None
    actual.square().sum().backward()
    torch.testing.assert_close(x.grad, reference_grad, rtol=1e-3, atol=1e-5)
    ours = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        mine = (
            ours['norm3.' + name[5:]]
            if name.startswith('norm.')
            else ours.get(name)
        )
        if mine is not None:
            torch.testing.assert_close(
                mine.grad, param.grad, rtol=1e-3, atol=1e-5, msg=name
            )


def test_small_maps_use_the_centre_of_the_bias_table():
    # A 5x5 map with window 7: one 5x5 window, no shift, as the official
    # block built for a 5x5 resolution (whose table is 9x9) computes it.
    torch.manual_seed(0)
    model = ACmixSwinTransformer(
        arch=dict(embed_dims=16, depths=(2,), num_heads=(2,)), out_indices=(0,)
    ).eval()
    stage = model.layers[0]
    block = stage.blocks[1]
    reference = randomise(RefBlock(16, 2, (5, 5), window=7, shift=3))
    table = torch.randn(13 * 13, 2)
    with torch.no_grad():
        reference.attn.relative_position_bias_table.copy_(
            table.view(13, 13, 2)[2:11, 2:11].reshape(81, 2)
        )
    state = reference.state_dict()
    state['attn.relative_position_bias_table'] = table
    del state['attn.relative_position_index']
    assert 'attn_mask' not in state  # no shift at this size
    block.load_state_dict(state)
    x = torch.randn(2, 25, 16)
    assert stage.windowing((5, 5)) == (5, 0)
    with torch.no_grad():
        torch.testing.assert_close(
            block(x, (5, 5), 5, 0, None), reference(x), rtol=1e-4, atol=1e-5
        )


def test_converted_weights_load_with_fewer_outputs(converted):
    # RetinaNet uses stages 1-3: norm0 of the converted file is dropped.
    saved = torch.load(converted, weights_only=True)['state_dict']
    backbone = {k[len('backbone.') :]: v for k, v in saved.items()}
    model = ACmixSwinTransformer(arch=SMALL, out_indices=(1, 2, 3))
    model.load_state_dict(backbone, strict=True)
    assert not hasattr(model, 'norm0')
    assert torch.equal(model.norm3.weight, backbone['norm3.weight'])
    # A detector's state dict: the hook sees the 'backbone.' prefix.
    detector = nn.Module()
    detector.backbone = ACmixSwinTransformer(arch=SMALL, out_indices=(3,))
    detector.load_state_dict(saved, strict=True)


def test_pretrained_init_cfg_with_fewer_outputs(converted):
    model = pretrained(converted, out_indices=(1, 2, 3))
    assert not hasattr(model, 'norm0')


def test_cli_reads_a_release_whose_config_class_is_absent(reference, tmp_path):
    # The released files pickle a yacs CfgNode; yacs is no dependency here,
    # and the node is read (weights_only=True) as an OrderedDict.
    package = tmp_path / 'yacs'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'config.py').write_text('class CfgNode(dict):\n    pass\n')
    sys.path.insert(0, str(tmp_path))
    try:
        node = __import__('yacs.config').config.CfgNode(
            MODEL={'TYPE': 'swin_acmix'}
        )
        checkpoint = dict(released_checkpoint(reference), config=node)
        torch.save(checkpoint, tmp_path / 'release.pth')
    finally:
        sys.path.remove(str(tmp_path))
        del sys.modules['yacs.config'], sys.modules['yacs']
    dst = tmp_path / 'converted.pth'
    convert_cli(
        convert_acmix_swin, 'test', [str(tmp_path / 'release.pth'), str(dst)]
    )
    assert dst.exists()


def test_converter_names_missing_and_unknown_keys(reference):
    checkpoint = released_checkpoint(reference)
    state = dict(checkpoint['model'])
    state.pop('layers.1.blocks.0.mlp.fc2.bias')
    state.pop('norm.bias')
    state['layers.1.blocks.0.attn.extra'] = torch.zeros(1)
    with pytest.raises(
        KeyError, match=r"fc2.bias', 'norm.bias'\].*attn.extra"
    ):
        convert_acmix_swin(state)


def test_converter_rejects_a_plain_swin_naming_the_acmix_keys(reference):
    plain = {
        k: v
        for k, v in reference.state_dict().items()
        if not any(s in k for s in ('.fc.', 'dep_conv', 'rate'))
    }
    with pytest.raises(
        KeyError,
        match=r'plain Swin.*attn\.fc\.weight.*'
        r'attn\.dep_conv\.weight.*attn\.rate1',
    ):
        convert_acmix_swin({'model': plain})


def test_converter_fits_a_given_model_and_rejects_other_shapes(reference):
    checkpoint = released_checkpoint(reference)
    model = ACmixSwinTransformer(arch=SMALL, out_indices=(0, 2))
    assert set(convert_acmix_swin(checkpoint, model)) == set(
        model.state_dict()
    )
    wider = ACmixSwinTransformer(arch=dict(SMALL, embed_dims=64))
    with pytest.raises(ValueError, match='patch_embed.proj.weight'):
        convert_acmix_swin(checkpoint, wider)


def test_converter_cli_reports_errors_and_writes_nothing(tmp_path, capsys):
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save({'model': {'head.weight': torch.zeros(2, 2)}}, src)
    with pytest.raises(SystemExit) as exit_info:
        convert_cli(convert_acmix_swin, 'test', [str(src), str(dst)])
    assert exit_info.value.code == 1
    assert 'patch_embed.proj.weight' in capsys.readouterr().err
    assert not dst.exists()
