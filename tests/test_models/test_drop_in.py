"""ACmix and X-volution as conv layers inside mmdet's and mmseg's ResNets."""

import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmengine.registry import DefaultScope

from mmacmix.models import ACmix

ACMIX_PARAMS = (
    'rate1',
    'rate2',
    'conv1.weight',
    'conv1.bias',
    'conv2.weight',
    'conv2.bias',
    'conv3.weight',
    'conv3.bias',
    'conv_p.weight',
    'conv_p.bias',
    'fc.weight',
    'dep_conv.weight',
)


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
@pytest.mark.parametrize('stride', [1, 2])
def test_build_conv_layer_makes_an_acmix_that_shapes_like_a_conv(
    scope, stride
):
    with DefaultScope.overwrite_default_scope(scope):
        layer = build_conv_layer(
            dict(type='mmacmix.ACmix'),
            16,
            16,
            kernel_size=3,
            stride=stride,
            padding=1,
            dilation=1,
            bias=False,
        )
    assert isinstance(layer, ACmix) and layer.stride == stride
    conv = torch.nn.Conv2d(16, 16, 3, stride=stride, padding=1)
    x = torch.randn(1, 16, 11, 14)
    assert layer(x).shape == conv(x).shape


def test_arguments_it_cannot_honour_are_refused():
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ValueError, match='dilation=1.*dilation=2'):
            build_conv_layer(
                dict(type='mmacmix.ACmix'),
                16,
                16,
                kernel_size=3,
                stride=1,
                padding=2,
                dilation=2,
                bias=False,
            )


def resnet50(scope: str, **kwargs) -> torch.nn.Module:
    if scope == 'mmdet':
        from mmdet.registry import MODELS

        cfg = dict(type='ResNet', depth=50)
    else:
        from mmseg.registry import MODELS

        cfg = dict(type='ResNetV1c', depth=50)
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(dict(cfg, **kwargs))


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_imagenet_weights_fill_everything_but_the_replaced_convs(scope):
    imagenet = resnet50(scope).state_dict()
    imagenet['fc.weight'] = torch.zeros(1000, 2048)  # the classifier
    imagenet['fc.bias'] = torch.zeros(1000)
    model = resnet50(
        scope,
        dcn=dict(type='mmacmix.ACmix'),
        stage_with_dcn=(False, True, True, True),
    )
    result = model.load_state_dict(imagenet, strict=False)

    blocks = {2: 4, 3: 6, 4: 3}
    replaced = [
        f'layer{s}.{b}.conv2' for s, n in blocks.items() for b in range(n)
    ]
    assert set(result.missing_keys) == {
        f'{conv}.{param}' for conv in replaced for param in ACMIX_PARAMS
    }
    assert set(result.unexpected_keys) == {
        'fc.weight',
        'fc.bias',
        *(f'{conv}.weight' for conv in replaced),
    }
    assert all(isinstance(model.get_submodule(c), ACmix) for c in replaced)
    stage1 = model.get_submodule('layer1.0.conv2')
    assert torch.equal(stage1.weight, imagenet['layer1.0.conv2.weight'])
