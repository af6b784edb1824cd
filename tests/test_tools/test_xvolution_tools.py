"""X-volution's tools: the ResNet converter's command line, the deploy
options found in configs, and the reparameterize tool on a detector."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from model_helpers import calibrate, torchvision_resnet

from mmacmix.deploy import deploy_options, reparameterize
from mmacmix.models import XVolutionResNet

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / 'tools/model_converters/resnet2xvolution.py'
CONFIGS = REPO / 'configs/xvolution_resnet'


@pytest.fixture(scope='module')
def resnet18() -> tuple[dict, torch.nn.Module]:
    """A torchvision-style ResNet-18 (copy the state dict to change it)."""
    return torchvision_resnet(18)


def test_converter_cli_writes_a_checkpoint_that_loads_strictly(
    tmp_path, resnet18
):
    state, plain = resnet18
    src, dst = tmp_path / 'resnet18.pth', tmp_path / 'xvolution.pth'
    torch.save(state, src)
    command = [sys.executable, str(CONVERTER), str(src), str(dst)]
    subprocess.run(
        [*command, '--depth', '18'], check=True, cwd=REPO, capture_output=True
    )
    saved = torch.load(dst, weights_only=True)['state_dict']
    assert all(k.startswith('backbone.') for k in saved)
    loaded = XVolutionResNet(
        depth=18,
        init_cfg=dict(
            type='Pretrained', checkpoint=str(dst), prefix='backbone.'
        ),
    )
    loaded.init_weights()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), loaded.eval()(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'name, options',
    [
        (
            'retinanet_xvolution-r50_fpn_1x_coco.py',
            ['model.backbone.deploy=True'],
        ),
        (
            '../drop_in/retinanet_r50-xvolution-c4_fpn_1x_coco.py',
            ['model.backbone.dcn.deploy=True'],
        ),
    ],
)
def test_deploy_options_are_found_in_configs(name, options):
    model_cfg = Config.fromfile(str(CONFIGS / name)).model
    assert deploy_options(model_cfg) == options


def test_reparameterized_detector_predicts_the_same(tmp_path):
    from mmdet.structures import DetDataSample

    config = str(CONFIGS / 'retinanet_xvolution-r50_fpn_1x_coco.py')
    cfg = Config.fromfile(config)
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    calibrate(model.backbone, torch.randn(2, 3, 64, 64))
    checkpoint, out = tmp_path / 'trained.pth', tmp_path / 'deployed.pth'
    torch.save(
        {'meta': {'epoch': 12}, 'state_dict': model.state_dict()}, checkpoint
    )
    options = reparameterize(config, str(checkpoint), str(out))
    assert options == ['model.backbone.deploy=True']

    deployed_cfg = Config.fromfile(config)
    deployed_cfg.merge_from_dict({'model.backbone.deploy': True})
    deployed = MODELS.build(deployed_cfg.model)
    saved = torch.load(out, weights_only=False)
    assert saved['meta']['epoch'] == 12 and saved['meta']['deploy']
    deployed.load_state_dict(saved['state_dict'], strict=True)
    assert not any('pssa' in k for k in saved['state_dict'])

    images = torch.randn(1, 3, 64, 64)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0)
        )
    )
    results = []
    for net in (model.eval(), deployed.eval()):
        with torch.no_grad():
            tensors = net(images, mode='tensor')
            results.append(
                (
                    tensors,
                    net(images, [sample.clone()], mode='predict')[
                        0
                    ].pred_instances,
                )
            )
    (tensors, trained), (deployed_tensors, deployed_pred) = results
    for level_a, level_b in zip(tensors, deployed_tensors, strict=True):
        for a, b in zip(level_a, level_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(trained) == len(deployed_pred) > 0
    torch.testing.assert_close(
        trained.scores, deployed_pred.scores, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        trained.bboxes, deployed_pred.bboxes, rtol=1e-4, atol=1e-3
    )
    assert torch.equal(trained.labels, deployed_pred.labels)


def test_reparameterize_refuses_a_model_without_xvolution(tmp_path):
    config = REPO / 'configs/drop_in/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py'
    trained = tmp_path / 'trained.pth'
    torch.save({'state_dict': {'conv1.weight': torch.zeros(1)}}, trained)
    with pytest.raises(ValueError, match='has no X-volution'):
        reparameterize(str(config), str(trained), str(tmp_path / 'out.pth'))
    assert list(tmp_path.iterdir()) == [trained]
