"""ONNX export of every family with dynamic batch, height and width.

Each backbone goes through what ``tools/deploy/export_onnx.py`` runs
(:mod:`mmacmix.deploy`: config, strict checkpoint loading, export) from a
checkpoint of random, non-trivial weights; the file is then run with
onnxruntime at two sizes other than the traced one, with another batch
size, and compared with the PyTorch model: largest absolute difference
below 1e-4 (float32 rounding of the same arithmetic in another order stays
around 1e-6 here).
"""

import importlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mmengine.logging import MMLogger
from torch import nn

from mmacmix.deploy import build_backbone, export_onnx, load_backbone_cfg
from mmacmix.models import (
    ACmix,
    ACmixPVT,
    ACmixResNet,
    ACmixSAN,
    ACmixSwinTransformer,
    XVolution,
    XVolutionResNet,
)

local_attention_module = importlib.import_module('mmacmix.ops.local_attention')

ATOL = 1e-4
TINY_SWIN = dict(embed_dims=12, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))
# PVT's heads; stages 1-2 fuse the convolution path, 3-4 factorise it.
TINY_PVT = dict(
    embed_dims=(8, 16, 40, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 5, 8)
)


def export(
    checkpoint: Path,
    out: Path,
    config: Path | None = None,
    backbone_cfg: str | None = None,
    **kwargs,
) -> dict:
    """Exports as the command line does; returns the checked differences."""
    cfg = load_backbone_cfg(config and str(config), backbone_cfg)
    model = build_backbone(cfg, str(checkpoint))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the tracer's size warnings
        return export_onnx(model, str(out), **kwargs)


def randomised(model: nn.Module) -> nn.Module:
    """Random weights and batch-norm statistics of a plausible scale.

    Norm scales and shifts are random, their statistics measured on random
    images, and residual branches end at a fifth of the shortcut (about a
    trained ResNet's balance): at full scale a random 26-layer stack is so
    ill-conditioned that float32 PyTorch itself drifts 7e-5 from float64 at
    stage 4, and no graph could be checked to 1e-4 against it. Outputs are
    of order 1 to 10 in every family.
    """
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    for block in model.modules():
        # Any residual block (basic, bottleneck) names its last norm.
        if isinstance(getattr(type(block), 'last_norm', None), property):
            last = block.last_norm
            if isinstance(last, XVolution):
                last = [last.conv_bn, last.pssa_bn]  # its norms end the block
            for norm in last if isinstance(last, list) else [last]:
                nn.init.uniform_(norm.weight, 0.1, 0.3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 96, 96, generator=generator))
    return model.eval()


def save_backbone(model: nn.Module, path: Path) -> Path:
    torch.save(
        {
            'state_dict': {
                f'backbone.{k}': v for k, v in model.state_dict().items()
            }
        },
        path,
    )
    return path


def onnx_differences(
    path: Path, model: nn.Module, sizes, batch: int = 3
) -> list[float]:
    """Runs the file with onnxruntime; the largest difference per size."""
    session = onnxruntime.InferenceSession(
        str(path), providers=['CPUExecutionProvider']
    )
    diffs = []
    for size in sizes:
        images = torch.randn(batch, 3, *size)
        with torch.no_grad():
            expected = model(images)
        got = session.run(None, {'input': images.numpy()})
        assert len(got) == len(expected)
        worst = 0.0
        for ours, theirs in zip(got, expected):
            assert ours.shape == tuple(theirs.shape)
            assert np.isfinite(ours).all()
            worst = max(worst, float(np.abs(ours - theirs.numpy()).max()))
        diffs.append(worst)
    return diffs


def standard_ops_only(path: Path) -> set[str]:
    """Checks the graph and returns its operator types (all ONNX ones)."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {node.domain for node in proto.graph.node} <= {'', 'ai.onnx'}
    return {node.op_type for node in proto.graph.node}


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize(
    'size', [(1, 1), (2, 3), (5, 4), (9, 11), (16, 7)]
)  # windows wider than the map fold periodically
def test_exported_local_attention_equals_the_kernel(stride, size):
    torch.manual_seed(0)
    k = torch.randn(2, 3, *size, dtype=torch.float64)
    v = torch.randn_like(k)
    q = torch.randn(2, 3, *(-(-s // stride) for s in size)).double()
    graph = local_attention_module._local_attention_graph
    expected = local_attention_module.local_attention(q, k, v, 7, stride)
    assert (graph(q, k, v, 7, stride) - expected).abs().max() < 1e-12


def export_op(op: nn.Module, path: Path) -> set[str]:
    """Exports an op traced at 12x10 with dynamic batch, height and width;
    returns its operator types (all standard ONNX)."""
    torch.onnx.export(
        op,
        (torch.randn(1, 8, 12, 10),),
        str(path),
        dynamo=False,
        input_names=['x'],
        dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}},
    )
    return standard_ops_only(path)


def check_op_sizes(path: Path, op: nn.Module, sizes) -> None:
    """Runs an exported op with onnxruntime at ``sizes`` (batch 2) and
    compares with PyTorch: shapes equal, values within ATOL."""
    session = onnxruntime.InferenceSession(
        str(path), providers=['CPUExecutionProvider']
    )
    for size in sizes:
        x = torch.randn(2, 8, *size)
        with torch.no_grad():
            expected = op(x).numpy()
        got = session.run(None, {'x': x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < ATOL, size


def test_acmix_op_exports_for_any_size(tmp_path):
    # From 1x1 (one-step position grid, everything folded) upwards.
    torch.manual_seed(0)
    op = ACmix(8, 8, stride=2, num_heads=2).eval()
    with torch.no_grad():
        for param in op.parameters():
            param.normal_(0, 0.5)
    path = tmp_path / 'acmix.onnx'
    assert 'Gather' in export_op(op, path)
    check_op_sizes(path, op, [(1, 1), (2, 3), (7, 13), (31, 20)])


def test_xvolution_sa_op_exports_for_any_size(tmp_path):
    # X-volution (SA) has no deployed form: its training form, in eval mode,
    # is what is exported, global attention over any number of positions.
    torch.manual_seed(0)
    op = XVolution(8, 8, stride=2, attention='global', num_heads=2)
    with torch.no_grad():
        for param in op.parameters():
            param.normal_(0, 0.5)
    op.eval()
    path = tmp_path / 'xvolution-sa.onnx'
    assert 'Softmax' in export_op(op, path)
    check_op_sizes(path, op, [(1, 1), (5, 3), (17, 22)])


def test_acmix_resnet_from_a_config(tmp_path):
    torch.manual_seed(0)
    model = randomised(ACmixResNet(depth=26, zero_init_residual=False))
    checkpoint = save_backbone(model, tmp_path / 'acmix-r26.pth')
    config = tmp_path / 'detector.py'
    config.write_text(
        'model = dict(\n'
        "    type='SomeDetector',\n"
        "    backbone=dict(type='mmacmix.ACmixResNet', depth=26,\n"
        "                  norm_cfg=dict(type='SyncBN')))\n"
    )
    out = tmp_path / 'acmix-r26.onnx'
    checked = export(
        checkpoint,
        out,
        config=config,
        sample_size=(64, 64),
        verify_sizes=[(64, 64)],
    )
    assert list(checked) == [(64, 64)]
    ops = standard_ops_only(out)
    assert 'Gather' in ops and 'Softmax' in ops
    diffs = onnx_differences(out, model, [(45, 77), (97, 64)])
    assert max(diffs) < ATOL, diffs


def test_xvolution_resnet_exports_in_deployed_form(tmp_path):
    torch.manual_seed(0)
    trained = XVolutionResNet(
        depth=18,
        xvolution_stages=(False, True, True, False),
        zero_init_residual=False,
    )
    randomised(trained)
    checkpoint = save_backbone(trained, tmp_path / 'xvolution-r18.pth')
    out = tmp_path / 'xvolution-r18.onnx'
    cfg = (
        "dict(type='mmacmix.XVolutionResNet', depth=18, "
        'xvolution_stages=(False, True, True, False))'
    )
    export(checkpoint, out, backbone_cfg=cfg, sample_size=(64, 64))
    proto = onnx.load(str(out))
    names = [node.name for node in proto.graph.node]
    # Deployed: no PSSA branch and no branch norms are left in the graph.
    assert [n for n in names if 'layer2.0/conv1' in n]
    assert not [n for n in names if 'pssa' in n or 'conv_bn' in n]
    standard_ops_only(out)
    # The deployed graph computes the trained model (in eval mode).
    diffs = onnx_differences(out, trained, [(33, 47), (80, 61)])
    assert max(diffs) < ATOL, diffs


def test_acmix_swin_keeps_padding_and_masks_dynamic(tmp_path):
    torch.manual_seed(0)
    model = randomised(
        ACmixSwinTransformer(arch=TINY_SWIN, drop_path_rate=0.0)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(
                ('rate1', 'rate2', 'relative_position_bias_table')
            ):
                param.uniform_(-1, 1)
    checkpoint = save_backbone(model, tmp_path / 'swin.pth')
    out = tmp_path / 'swin.onnx'
    cfg = (
        '{"type": "mmacmix.ACmixSwinTransformer", "arch": {"embed_dims": '
        '12, "depths": [2, 2, 2, 2], "num_heads": [1, 1, 1, 1]}}'
    )
    # Traced at 256x256, where no stage needs padding; checked below.
    export(checkpoint, out, backbone_cfg=cfg, verify_sizes=[])
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta['min_input_side'] == '225'
    # 225x301 and 260x250 pad every stage differently (e.g. stage 1 is
    # 57x76 -> 63x77 and 65x63 -> 70x63) and shift windows with masks.
    diffs = onnx_differences(out, model, [(225, 301), (260, 250)], batch=1)
    assert max(diffs) < ATOL, diffs


def test_acmix_pvt_pads_and_reduces_for_any_size(tmp_path):
    torch.manual_seed(0)
    model = randomised(ACmixPVT(arch=TINY_PVT, drop_path_rate=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(('rate1', 'rate2', 'dep_conv.weight')):
                param.uniform_(-1, 1)
    checkpoint = save_backbone(model, tmp_path / 'pvt.pth')
    out = tmp_path / 'pvt.onnx'
    cfg = (
        '{"type": "mmacmix.ACmixPVT", "arch": {"embed_dims": [8, 16, 40, '
        '64], "depths": [1, 1, 1, 1], "num_heads": [1, 2, 5, 8]}}'
    )
    # Traced at 256x256, where nothing is padded; checked below.
    export(checkpoint, out, backbone_cfg=cfg, verify_sizes=[])
    assert {'Resize', 'Pad', 'Conv'} <= standard_ops_only(out)
    # Every patch embedding and spatial reduction pads, down to 1x1 maps.
    diffs = onnx_differences(out, model, [(97, 131), (5, 3)])
    assert max(diffs) < ATOL, diffs


def test_acmix_san_reflects_windows_for_any_size(tmp_path):
    torch.manual_seed(0)
    arch = dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 5, 5, 5, 5))
    model = randomised(ACmixSAN(arch=arch, zero_init_residual=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(('rate1', 'rate2', 'dep_conv.weight')):
                param.uniform_(-1, 1)
            elif name.endswith(('.conv.weight', '.conv.bias')):
                param.mul_(0.2)  # residual branches at a fifth
    checkpoint = save_backbone(model, tmp_path / 'san.pth')
    out = tmp_path / 'san.onnx'
    cfg = (
        '{"type": "mmacmix.ACmixSAN", "arch": {"blocks": [1, 1, 1, 1, 1], '
        '"kernel_sizes": [3, 5, 5, 5, 5]}, "zero_init_residual": false}'
    )
    traced_at = dict(sample_size=(48, 40), verify_sizes=[])
    export(checkpoint, out, backbone_cfg=cfg, **traced_at)
    assert 'Conv' in standard_ops_only(out)
    # Odd sizes round the pools up; at 5x3 every window folds its
    # reflection over maps narrower than itself.
    diffs = onnx_differences(out, model, [(45, 67), (5, 3)])
    assert max(diffs) < ATOL, diffs


def test_swin_sizes_with_other_windows_are_refused(tmp_path):
    model = ACmixSwinTransformer(arch=TINY_SWIN).eval()
    with pytest.raises(ValueError, match='at least 225 pixels.*224, 256'):
        export_onnx(model, str(tmp_path / 'x.onnx'), sample_size=(224, 256))
    assert list(tmp_path.iterdir()) == []


def test_a_graph_that_misses_the_tolerance_is_not_written(tmp_path):
    torch.manual_seed(0)
    model = XVolutionResNet(depth=18, out_indices=(3,)).eval()
    out = tmp_path / 'model.onnx'
    # No two float32 implementations agree to the last bit over 18 layers.
    with pytest.raises(ValueError, match='differs from PyTorch by'):
        export_onnx(model, str(out), sample_size=(64, 64), atol=0.0)
    assert list(tmp_path.iterdir()) == []
    diffs = export_onnx(
        model, str(out), sample_size=(64, 64), verify_sizes=[(70, 50)]
    )
    assert list(diffs) == [(70, 50)] and diffs[(70, 50)] < ATOL
    assert out.stat().st_mode & 0o044  # readable by others, like any file
