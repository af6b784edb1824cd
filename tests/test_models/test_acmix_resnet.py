"""ACmixResNet: architecture, API of mmdet's ResNet, official checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmacmix.models import ACmixResNet, convert_acmix_resnet

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / 'tools/model_converters/acmix_resnet2mmacmix.py'


@pytest.mark.parametrize(
    'depth, expected',
    [
        (26, 8_438_816),
        (38, 12_361_896),
        (50, 16_284_976),
    ],
)
def test_parameter_count_equals_the_official_model_without_fc(depth, expected):
    # The official ResNet/ResNet_ImageNet.py models have 10.49M, 14.41M and
    # 18.33M parameters with their 1000-class fc (2048 * 1000 + 1000 =
    # 2_049_000), which the backbone lacks: these counts plus the fc give
    # 10_487_816, 14_410_896 and 18_333_976.
    model = ACmixResNet(depth=depth)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_invalid_depth_names_the_valid_ones():
    with pytest.raises(ValueError, match=r'\[26, 38, 50\]'):
        ACmixResNet(depth=18)


def test_acmix_stages_choose_where_acmix_replaces_the_3x3_convs():
    from mmacmix.models import ACmix

    model = ACmixResNet(depth=26, acmix_stages=(False, True, False, True))
    kinds = {
        name: type(module).__name__
        for name, module in model.named_modules()
        if name.endswith('.conv2') and name.count('.') == 2
    }
    # 1 + 2 + 4 + 1 bottlenecks; stages 2 and 4 have ACmix.
    assert kinds == {
        'layer1.0.conv2': 'Conv2d',
        'layer2.0.conv2': 'ACmix',
        'layer2.1.conv2': 'ACmix',
        **{f'layer3.{i}.conv2': 'Conv2d' for i in range(4)},
        'layer4.0.conv2': 'ACmix',
    }
    plain = ACmixResNet(depth=26, acmix_stages=(False,) * 4)
    assert not any(isinstance(m, ACmix) for m in plain.modules())
    assert plain.layer2[0].conv2.stride == (2, 2)
    with pytest.raises(ValueError, match=r'one flag per stage \(4\)'):
        ACmixResNet(depth=26, acmix_stages=(True, False))
    with pytest.raises(ValueError, match='one flag per stage'):
        ACmixResNet(depth=26, acmix_stages='tttt')
    with pytest.raises(ValueError, match='one flag per stage'):
        ACmixResNet(depth=26, acmix_stages=True)
    with pytest.raises(ValueError, match='True or False'):
        ACmixResNet(depth=26, acmix_stages=(1, 1, 1, 0))


def official_checkpoint(model: ACmixResNet) -> dict:
    """What the official main.py saves for this architecture."""
    state = {f'module.{k}': v for k, v in model.state_dict().items()}
    state['module.fc.weight'] = torch.randn(1000, 2048)
    state['module.fc.bias'] = torch.randn(1000)
    return {
        'epoch': 90,
        'arch': 'acmix',
        'state_dict': state,
        'best_acc1': 76.1,
        'optimizer': {'state': {}},
    }


def test_converted_checkpoint_reproduces_the_source_features(tmp_path):
    torch.manual_seed(0)
    source = ACmixResNet(depth=26)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src, dst = tmp_path / 'official.pth', tmp_path / 'mmacmix.pth'
    torch.save(official_checkpoint(source), src)
    subprocess.run([sys.executable, CONVERTER, src, dst], check=True, cwd=REPO)
    saved = torch.load(dst, weights_only=True)['state_dict']
    assert all(k.startswith('backbone.') for k in saved)

    loaded = ACmixResNet(
        depth=26,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(dst), prefix='backbone.'
        ),
    )
    loaded.init_weights()
    x = torch.randn(1, 3, 64, 64)
    source.eval(), loaded.eval()
    with torch.no_grad():
        for a, b in zip(source(x), loaded(x)):
            assert torch.equal(a, b)


def test_converter_names_missing_and_unknown_keys():
    checkpoint = official_checkpoint(ACmixResNet(depth=26))
    state = checkpoint['state_dict']
    state.pop('module.layer2.1.conv2.rate2')
    state['module.layer2.1.conv2.extra'] = torch.zeros(1)
    with pytest.raises(
        KeyError, match='layer2.1.conv2.rate2.*layer2.1.conv2.extra'
    ):
        convert_acmix_resnet(checkpoint)


def test_converter_rejects_a_plain_resnet_naming_acmix_keys(tmp_path):
    plain = {
        f'layer{s}.{b}.conv2.weight': torch.zeros(1)
        for s, n in zip(range(1, 5), (3, 4, 6, 3))
        for b in range(n)
    }
    with pytest.raises(KeyError, match='no ACmix key.*rate1'):
        convert_acmix_resnet({'state_dict': plain})


def test_converter_cli_refuses_bad_input_and_writes_nothing(tmp_path):
    src, dst = tmp_path / 'truncated.pth', tmp_path / 'out.pth'
    torch.save(official_checkpoint(ACmixResNet(depth=26)), src)
    src.write_bytes(src.read_bytes()[:1000])
    result = subprocess.run(
        [sys.executable, CONVERTER, src, dst],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert 'not a readable PyTorch checkpoint' in result.stderr
    assert list(tmp_path.iterdir()) == [src]

    dst.write_text('keep me')
    result = subprocess.run(
        [sys.executable, CONVERTER, src, dst],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert 'already exists' in result.stderr and dst.read_text() == 'keep me'


def test_pretrained_checkpoint_that_does_not_exist_is_named(tmp_path):
    path = tmp_path / 'missing.pth'
    model = ACmixResNet(
        depth=26, init_cfg=dict(type='Pretrained', checkpoint=str(path))
    )
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        model.init_weights()
