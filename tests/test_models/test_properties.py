"""Any input size: property tests over image sizes, for every family.

Hypothesis draws heights and widths from 32 to 300 and batches of 1 or 2
(operators: sides from 1 up). Every case checks the output shapes (channels,
and ``ceil(side / stride)`` rows and columns, as padded convolutions give)
and that every value is finite. The backbones are the smallest of each
family with their batch norms calibrated once on random images, so that
their eval-mode activations have the scale a trained model's have and
"finite" means something; example counts keep the file under a minute.
"""

import contextlib
import functools
import logging
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mmengine.logging import MMLogger
from torch import nn

from mmacmix.models import (
    ACmix,
    ACmixResNet,
    ACmixSwinTransformer,
    XVolution,
    XVolutionResNet,
)

SIDES = st.integers(min_value=32, max_value=300)
BATCHES = st.integers(min_value=1, max_value=2)
# A narrow Swin (12 channels, one head per stage): the window, shift and
# padding logic is that of Swin-T at a fraction of the cost.
TINY_SWIN = dict(embed_dims=12, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))
STRIDES = (4, 8, 16, 32)


def calibrated(model: nn.Module) -> nn.Module:
    """Gives the batch norms running statistics, then returns eval mode.

    Freshly initialised norms hold mean 0 and variance 1, so in eval mode
    a deep random network's activations grow layer by layer until they
    overflow: a fault of the weights, not of the sizes under test. The
    statistics are averaged over a small and a large image so that they
    fit the whole range of sizes.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the batches
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for side in (64, 256):
            model(torch.randn(2, 3, side, side, generator=generator))
    return model.eval()


@contextlib.contextmanager
def quiet_init():
    """Silences MMEngine's per-parameter log of ``init_weights``."""
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.cache
def backbone(name: str) -> nn.Module:
    """Builds (once per session) a small, calibrated backbone."""
    torch.manual_seed(0)
    if name == 'acmix_resnet':
        model = ACmixResNet(depth=26, zero_init_residual=False)
    elif name == 'xvolution_resnet':
        # X-volution in stages 2-4: strides 8 to 32 and every stride-2
        # op see odd sizes (stage 1, stride 1 only, would just cost time).
        model = XVolutionResNet(
            depth=18,
            xvolution_stages=(False, True, True, True),
            zero_init_residual=False,
        )
        with quiet_init():
            model.init_weights()
        # PSSA multiplies the map by itself, so its branch squares the
        # scale of the activations: at full weight a random 18-layer stack
        # overflows at 300 pixels even when calibrated. 0.3 is a partly
        # grown branch (converted ResNets start it at 0).
        for op in model.modules():
            if isinstance(op, XVolution):
                nn.init.constant_(op.pssa_bn.weight, 0.3)
        return calibrated(model)
    elif name == 'xvolution_resnet_deployed':
        model = backbone('xvolution_resnet')
        deployed = XVolutionResNet(
            depth=18, xvolution_stages=model.xvolution_stages
        )
        deployed.load_state_dict(model.state_dict())
        deployed.eval().switch_to_deploy()
        return deployed
    else:
        model = ACmixSwinTransformer(arch=TINY_SWIN, drop_path_rate=0.0)
    with quiet_init():
        model.init_weights()
    return calibrated(model)


def expected_shapes(
    batch: int, size: tuple[int, int], channels: list[int]
) -> list[tuple[int, ...]]:
    return [
        (batch, c, math.ceil(size[0] / s), math.ceil(size[1] / s))
        for c, s in zip(channels, STRIDES)
    ]


def check_backbone(
    name: str, batch: int, height: int, width: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Checks shapes, finiteness and batch independence.

    Returns:
        tuple: The input images and the outputs.
    """
    model = backbone(name)
    images = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        outs = model(images)
    shapes = [tuple(o.shape) for o in outs]
    assert shapes == expected_shapes(
        batch, (height, width), list(model.out_channels)
    )
    for out in outs:
        assert torch.isfinite(out).all()
    if batch == 2:
        # The samples of a batch stay independent at any size (padding
        # and windows must not mix them).
        with torch.no_grad():
            single = model(images[1:])
        for out, alone in zip(outs, single):
            torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-4)
    return images, outs


@settings(max_examples=5, deadline=None)
@given(batch=BATCHES, height=SIDES, width=SIDES)
def test_acmix_resnet_any_size(batch, height, width):
    check_backbone('acmix_resnet', batch, height, width)


@settings(max_examples=5, deadline=None)
@given(batch=BATCHES, height=SIDES, width=SIDES)
def test_xvolution_resnet_any_size_in_both_forms(batch, height, width):
    images, trained = check_backbone('xvolution_resnet', batch, height, width)
    # Re-parameterisation is exact at every size, borders included.
    with torch.no_grad():
        deployed = backbone('xvolution_resnet_deployed')(images)
    for a, b in zip(trained, deployed):
        assert a.shape == b.shape
        assert torch.isfinite(b).all()
        scale = a.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() / scale < 1e-4


@settings(max_examples=8, deadline=None)
@given(batch=BATCHES, height=SIDES, width=SIDES)
def test_acmix_swin_any_size(batch, height, width):
    # 32..300 spans both window rules: stage 4 from 1x1 (smaller windows,
    # no shift) to 10x10 (padded to 14, shifted windows with a mask).
    check_backbone('acmix_swin', batch, height, width)


OP_SIDES = st.integers(min_value=1, max_value=40)


@settings(max_examples=25, deadline=None)
@given(
    batch=BATCHES,
    height=OP_SIDES,
    width=OP_SIDES,
    stride=st.sampled_from([1, 2]),
    kind=st.sampled_from(
        ['acmix', 'xvolution', 'xvolution_deployed', 'xvolution_sa']
    ),
)
def test_ops_shape_like_a_padded_3x3_conv(batch, height, width, stride, kind):
    torch.manual_seed(0)
    if kind == 'acmix':
        op = ACmix(8, 8, stride=stride, num_heads=2)
    elif kind == 'xvolution_sa':
        op = XVolution(8, 8, stride=stride, attention='global', num_heads=2)
    else:
        op = XVolution(
            8, 8, stride=stride, deploy=kind == 'xvolution_deployed'
        )
        if op.deploy:  # its content-dependent kernel starts at zero
            nn.init.normal_(op.dynamic_weight, std=0.1)
    op.eval()
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=1)
    x = torch.randn(batch, 8, height, width, requires_grad=True)
    out = op(x)
    assert out.shape == conv(x).shape
    assert torch.isfinite(out).all()
    # Gradients are finite too: a 1-pixel map must not divide by zero
    # (e.g. a position grid of one step) on the way back.
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for param in op.parameters():
        assert param.grad is None or torch.isfinite(param.grad).all()
