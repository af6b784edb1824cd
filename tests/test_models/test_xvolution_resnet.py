"""X-volution ResNet: where the X-volutions go, deployment of the whole
backbone, and the conversion of torchvision ResNets (the function; its CLI
is in tests/test_tools). The contract every backbone keeps is in
test_backbone_contract.py."""

import pytest
import torch
from model_helpers import calibrate, torchvision_resnet

from mmacmix.models import (
    XVolution,
    XVolutionResNet,
    convert_resnet_to_xvolution,
)


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
    # Checked as strictly as ACmixResNet's acmix_stages, same messages.
    with pytest.raises(ValueError, match=r'one flag per stage \(4\)'):
        XVolutionResNet(depth=18, xvolution_stages=(True,))
    with pytest.raises(ValueError, match='one flag per stage'):
        XVolutionResNet(depth=18, xvolution_stages='tttt')
    with pytest.raises(ValueError, match='one flag per stage'):
        XVolutionResNet(depth=18, xvolution_stages=True)
    with pytest.raises(ValueError, match=r'True or False, got \(1, 1, 1, 0\)'):
        XVolutionResNet(depth=18, xvolution_stages=(1, 1, 1, 0))
    with pytest.raises(ValueError, match=r'\[18, 34, 50, 101\]'):
        XVolutionResNet(depth=26)


def test_frozen_stages_survive_switch_to_deploy():
    # Before deployment, frozen_stages and norm_eval reach the X-volutions'
    # norms like every backbone's (test_backbone_contract.py).
    model = XVolutionResNet(depth=18, frozen_stages=3, norm_eval=True)
    model.train()
    assert not model.layer3[0].conv1.pssa_bn.training
    model.switch_to_deploy()
    model.train()
    assert not model.layer3[0].conv1.weight.requires_grad
    assert model.layer4[0].conv1.weight.requires_grad


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
