"""Bad input fails clearly: every error names what is wrong and what is valid.

Covers what the per-family test files do not: the registry path for
unknown architectures, wrong image batches of the ResNet backbones, the
three converter command lines and the ONNX export command line on bad
files, and configs whose pretrained checkpoint is missing. Every failing
command is checked to leave its output folder as it was.
"""

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

from mmacmix.models import ACmixResNet, XVolutionResNet
from mmacmix.models.acmix_swin import ACMIX_KEYS, ACmixSwinTransformer
from mmacmix.registry import MODELS

xvolution = pytest.importorskip('mmacmix.models.xvolution')

REPO = Path(__file__).resolve().parents[2]
CONVERTERS = REPO / 'tools/model_converters'
ACMIX_RESNET_CLI = CONVERTERS / 'acmix_resnet2mmacmix.py'
ACMIX_SWIN_CLI = CONVERTERS / 'acmix_swin2mmacmix.py'
XVOLUTION_CLI = CONVERTERS / 'resnet2xvolution.py'
EXPORT_CLI = REPO / 'tools/deploy/export_onnx.py'
TINY_SWIN = dict(embed_dims=12, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))


def run_tool(tool: Path, *args, monkeypatch, capsys) -> tuple[int, str]:
    """Runs a command-line tool in this process (a subprocess would spend
    seconds importing torch); returns its exit status and stderr."""
    monkeypatch.setattr(sys, 'argv', [str(tool), *map(str, args)])
    try:
        runpy.run_path(str(tool), run_name='__main__')
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code or 0
    return code, capsys.readouterr().err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# Unknown architectures, built the way configs build them.


@pytest.mark.parametrize(
    'cfg, valid',
    [
        (dict(type='mmacmix.ACmixResNet', depth=101), r'\[26, 38, 50\]'),
        (
            dict(type='mmacmix.XVolutionResNet', depth=26),
            r'\[18, 34, 50, 101\]',
        ),
        (
            dict(type='mmacmix.ACmixSwinTransformer', arch='base'),
            r"\['s', 'small', 't', 'tiny'\]",
        ),
        (
            dict(type='mmacmix.ACmixSwinTransformer', arch=dict(depths=[2])),
            r"\['depths', 'embed_dims', 'num_heads'\]",
        ),
    ],
)
def test_unknown_arch_or_depth_lists_the_valid_ones(cfg, valid):
    with pytest.raises(ValueError, match=valid):
        MODELS.build(cfg)


# Image batches of the wrong rank or channel count.


def resnet_backbones():
    return [
        ACmixResNet(depth=26),
        XVolutionResNet(depth=18),
    ]


@pytest.mark.parametrize(
    'model', resnet_backbones(), ids=lambda m: type(m).__name__
)
@pytest.mark.parametrize(
    'shape',
    [(3, 32, 32), (1, 1, 32, 32), (1, 4, 32, 32), (1, 1, 3, 32, 32)],
)
def test_backbones_reject_batches_that_are_not_b_3_h_w(model, shape):
    message = (
        f'{type(model).__name__} expects a 4-D (B, 3, H, W) tensor, got '
        f'shape {shape}'
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.zeros(shape))


def test_in_channels_decides_what_is_accepted():
    model = ACmixResNet(depth=26, in_channels=1, out_indices=(0,)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32))[0].shape == (1, 256, 8, 8)
    with pytest.raises(ValueError, match=r'\(B, 1, H, W\).*\(1, 3, 32, 32\)'):
        model(torch.zeros(1, 3, 32, 32))


# Converter command lines on files they cannot convert.


def plain_resnet50() -> dict:
    """A torchvision ResNet-50 state dict (with its fc head)."""
    plain = XVolutionResNet(
        depth=50, xvolution_stages=(False,) * 4
    ).state_dict()
    plain = {k: v for k, v in plain.items() if 'num_batches' not in k}
    plain['fc.weight'] = torch.zeros(1000, 2048)
    plain['fc.bias'] = torch.zeros(1000)
    return plain


def plain_swin() -> dict:
    """A release of a plain (non-ACmix) Swin, official key names."""
    state = ACmixSwinTransformer(arch=TINY_SWIN, out_indices=(3,))
    state = {
        k: v
        for k, v in state.state_dict().items()
        if not k.endswith(ACMIX_KEYS)
    }
    state['norm.weight'] = state.pop('norm3.weight')
    state['norm.bias'] = state.pop('norm3.bias')
    state['head.weight'] = torch.zeros(1000, 96)
    state['head.bias'] = torch.zeros(1000)
    return {'model': state, 'epoch': 300}


def test_acmix_resnet_cli_names_the_acmix_keys_of_a_plain_resnet(
    tmp_path, monkeypatch, capsys
):
    src = tmp_path / 'resnet50.pth'
    torch.save(plain_resnet50(), src)
    code, err = run_tool(
        ACMIX_RESNET_CLI,
        src,
        tmp_path / 'out.pth',
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1
    assert 'no ACmix key' in err and 'rate1' in err and 'dep_conv' in err
    assert listing(tmp_path) == ['resnet50.pth']


def test_acmix_swin_cli_names_the_acmix_keys_of_a_plain_swin(
    tmp_path, monkeypatch, capsys
):
    src = tmp_path / 'swin.pth'
    torch.save(plain_swin(), src)
    code, err = run_tool(
        ACMIX_SWIN_CLI,
        src,
        tmp_path / 'out.pth',
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1
    assert 'plain Swin' in err
    for key in ACMIX_KEYS:
        assert key in err
    assert 'layers.0.blocks.0.attn.dep_conv.weight' in err
    assert listing(tmp_path) == ['swin.pth']


def test_resnet2xvolution_cli_names_the_keys_of_an_acmix_resnet(
    tmp_path, monkeypatch, capsys
):
    src = tmp_path / 'acmix.pth'
    acmix = ACmixResNet(depth=50).state_dict()
    torch.save(
        {'state_dict': {f'module.{k}': v for k, v in acmix.items()}}, src
    )
    code, err = run_tool(
        XVOLUTION_CLI,
        src,
        tmp_path / 'out.pth',
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1
    # The plain 3x3 weight is missing; ACmix's projections are unknown.
    assert "missing keys ['layer1.0.conv2.weight'" in err
    assert 'layer1.0.conv2.conv_p.weight' in err
    assert listing(tmp_path) == ['acmix.pth']


def write_bad_sources(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files no converter can read, with the message each must give."""
    truncated = folder / 'truncated.pth'
    torch.save({'state_dict': {'a': torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = folder / 'notes.txt'
    text.write_text('not a checkpoint\n')
    listed = folder / 'list.pth'
    torch.save([torch.zeros(1)], listed)
    return {
        'truncated': (truncated, 'not a readable PyTorch checkpoint'),
        'text': (text, 'not a readable PyTorch checkpoint'),
        'list': (listed, 'holds a list, not a checkpoint dict'),
        'missing': (folder / 'absent.pth', "absent.pth' does not exist"),
    }


@pytest.mark.parametrize(
    'tool', [ACMIX_RESNET_CLI, ACMIX_SWIN_CLI, XVOLUTION_CLI], ids=str
)
def test_converter_clis_reject_unreadable_files_and_write_nothing(
    tool, tmp_path, monkeypatch, capsys
):
    sources = write_bad_sources(tmp_path)
    before = listing(tmp_path)
    for name, (src, message) in sources.items():
        code, err = run_tool(
            tool,
            src,
            tmp_path / 'out' / 'converted.pth',
            monkeypatch=monkeypatch,
            capsys=capsys,
        )
        assert code == 1, name
        assert message in err, (name, err)
        assert listing(tmp_path) == before, name


def test_converter_cli_keeps_an_existing_destination_unless_forced(
    tmp_path, monkeypatch, capsys
):
    source = ACmixSwinTransformer(arch=TINY_SWIN)
    state = dict(source.state_dict())
    for name in ('weight', 'bias'):
        state[f'norm.{name}'] = state.pop(f'norm3.{name}')
        for stage in range(3):
            state.pop(f'norm{stage}.{name}')
    src, dst = tmp_path / 'release.pth', tmp_path / 'converted.pth'
    torch.save({'model': state}, src)
    dst.write_text('keep me')
    code, err = run_tool(
        ACMIX_SWIN_CLI, src, dst, monkeypatch=monkeypatch, capsys=capsys
    )
    assert code == 1 and 'already exists' in err and '--force' in err
    assert dst.read_text() == 'keep me'
    assert listing(tmp_path) == ['converted.pth', 'release.pth']

    code, _ = run_tool(
        ACMIX_SWIN_CLI,
        src,
        dst,
        '--force',
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 0
    saved = torch.load(dst, weights_only=True)['state_dict']
    assert torch.equal(
        saved['backbone.layers.0.blocks.0.attn.rate1'],
        state['layers.0.blocks.0.attn.rate1'],
    )
    assert listing(tmp_path) == ['converted.pth', 'release.pth']


# Pretrained checkpoints that do not exist.


@pytest.mark.parametrize(
    'cfg',
    [
        dict(type='mmacmix.ACmixSwinTransformer', arch=TINY_SWIN),
        dict(type='mmacmix.XVolutionResNet', depth=18),
    ],
    ids=lambda cfg: cfg['type'],
)
def test_missing_pretrained_checkpoint_is_named(cfg, tmp_path):
    path = tmp_path / 'weights' / 'never-converted.pth'
    model = MODELS.build(
        dict(
            cfg,
            init_cfg=dict(
                type='Pretrained', checkpoint=str(path), prefix='backbone.'
            ),
        )
    )
    with pytest.raises(FileNotFoundError, match=str(path)):
        model.init_weights()


def test_export_of_a_config_whose_checkpoint_is_missing_names_it(
    tmp_path, monkeypatch, capsys
):
    config = (
        REPO / 'configs/acmix_swin/mask-rcnn_acmix-swin-t-p4-w7_fpn_1x_coco.py'
    )
    monkeypatch.chdir(tmp_path)  # the config's relative path stays missing
    code, err = run_tool(
        EXPORT_CLI,
        config,
        tmp_path / 'swin.onnx',
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1
    assert "'checkpoints/acmix-swin-t_in1k_mmacmix.pth' does not exist" in err
    assert listing(tmp_path) == []


# The export command line.


def test_export_cli_rejects_bad_arguments_and_writes_nothing(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / 'model.onnx'
    resnet = "dict(type='mmacmix.ACmixResNet', depth=26, out_indices=(3,))"
    wrong = tmp_path / 'r50.pth'
    torch.save(
        {
            f'backbone.{k}': v
            for k, v in ACmixResNet(depth=50, out_indices=(3,))
            .state_dict()
            .items()
        },
        wrong,
    )
    no_backbone = tmp_path / 'no_backbone.py'
    no_backbone.write_text("model = dict(type='Whatever')\n")
    cases = [
        (['--backbone-cfg', 'dict(type=', out], 'neither JSON nor'),
        (['--backbone-cfg', '[1, 2]', out], 'must be a dict with a type'),
        (
            ['--backbone-cfg', "dict(type=__import__('os'))", out],
            'only literals',
        ),
        (
            ['--backbone-cfg', "dict(type='mmacmix.Nope')", out],
            'Nope is not in the',
        ),
        ([tmp_path / 'absent.py', out], 'absent.py'),
        ([no_backbone, out], 'has no model.backbone'),
        # A checkpoint of another depth: every unexpected key is named.
        (
            ['--backbone-cfg', resnet, wrong, out],
            "0 missing keys [], 232 unexpected keys ['layer1.1.bn1.bias'",
        ),
    ]
    before = listing(tmp_path)
    for args, message in cases:
        code, err = run_tool(
            EXPORT_CLI, *args, monkeypatch=monkeypatch, capsys=capsys
        )
        assert code == 1, args
        assert message in err, (args, err)
        assert listing(tmp_path) == before, args

    # Wrong numbers of paths are usage errors (status 2).
    for args in ([out], ['--backbone-cfg', resnet, 'a', 'b', 'c']):
        code, err = run_tool(
            EXPORT_CLI, *args, monkeypatch=monkeypatch, capsys=capsys
        )
        assert code == 2 and 'expected' in err

    out.write_text('keep me')
    code, err = run_tool(
        EXPORT_CLI,
        '--backbone-cfg',
        resnet,
        out,
        monkeypatch=monkeypatch,
        capsys=capsys,
    )
    assert code == 1 and 'already exists' in err
    assert out.read_text() == 'keep me'
