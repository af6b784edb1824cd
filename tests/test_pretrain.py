"""Pretraining with mmpretrain: released classifiers converted for it, and
its Runner checkpoints as pretrained weights of our detection configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from test_acmix_swin import (  # the official-format reference model
    SMALL,
    RefSwinACmix,
    randomise,
    released_checkpoint,
)

from mmacmix.models import convert_acmix_swin
from mmacmix.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
SWIN_CONVERTER = REPO / 'tools/model_converters/acmix_swin2mmacmix.py'
CONFIG_ROOT = REPO / 'configs'


def build_classifier(backbone: dict, channels: int, num_classes: int):
    from mmpretrain.registry import MODELS

    cfg = dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=num_classes,
            in_channels=channels,
        ),
    )
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def test_swin_release_with_its_classifier_computes_the_official_logits(
    tmp_path,
):
    reference = randomise(RefSwinACmix(**SMALL)).eval().double()
    src, dst = tmp_path / 'release.pth', tmp_path / 'classifier.pth'
    torch.save(released_checkpoint(reference), src)
    subprocess.run(
        [sys.executable, SWIN_CONVERTER, src, dst, '--keep-classifier'],
        check=True,
        cwd=REPO,
        capture_output=True,
    )

    keys = torch.load(dst, weights_only=True)['state_dict'].keys()
    assert {key.split('.')[0] for key in keys} == {'backbone', 'head'}
    # What tools/test.py builds from the ImageNet config, out_indices=(3,).
    model = build_classifier(
        dict(
            type='mmacmix.ACmixSwinTransformer',
            arch=SMALL,
            out_indices=(3,),
            drop_path_rate=0.0,
        ),
        channels=reference.head.in_features,
        num_classes=1000,
    )
    load_checkpoint(model, str(dst), strict=True)
    model.eval().double()

    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.head(reference.forward_features(images))
        logits = model(images, mode='tensor')
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    assert logits.std() > 0.1  # random weights: far from constant


def test_keeping_a_classifier_the_release_lacks_is_an_error():
    reference = randomise(RefSwinACmix(**SMALL))
    checkpoint = released_checkpoint(reference)
    del checkpoint['model']['head.bias']
    with pytest.raises(KeyError, match='no classifier to keep'):
        convert_acmix_swin(checkpoint, keep_classifier=True)


def test_runner_checkpoint_of_a_classifier_loads_into_every_det_seg_config(
    imagenet_root, tmp_path
):
    # Two iterations of the ImageNet recipe with the project's Runner (what
    # tools/train.py runs), on 4 generated images at 64x64.
    from mmacmix.apis.runner import train

    torch.manual_seed(0)
    family = CONFIG_ROOT / 'acmix_resnet'
    small_data = dict(
        batch_size=2,
        num_workers=0,
        persistent_workers=False,
        dataset=dict(
            data_root=imagenet_root,
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='RandomResizedCrop', scale=64),
                dict(type='PackInputs'),
            ],
        ),
    )
    runner = train(
        str(family / 'acmix-r50_8xb16_in1k.py'),
        work_dir=str(tmp_path),
        cfg_options={
            'train_dataloader': small_data,
            'train_cfg.max_epochs': 1,
            'val_dataloader': None,
            'val_cfg': None,
            'val_evaluator': None,
            'default_hooks.logger.interval': 1,
        },
    )
    assert runner.iter == 2
    checkpoint = str(tmp_path / 'epoch_1.pth')
    trained = runner.model.backbone.eval()
    # The classifier computes stage 4 only; the same weights in a backbone
    # with every output give the features the detectors must see.
    expected_model = MODELS.build(
        dict(type='mmacmix.ACmixResNet', depth=50, out_indices=(0, 1, 2, 3))
    ).eval()
    expected_model.load_state_dict(trained.state_dict())
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = expected_model(images)
        torch.testing.assert_close(expected[3], trained(images)[0])

    configs = sorted(
        path for path in family.glob('*.py') if '_in1k' not in path.name
    )
    assert len(configs) == 3  # Mask R-CNN, RetinaNet, UperNet
    for path in configs:
        cfg = Config.fromfile(str(path))
        init_cfg = cfg.model.backbone.init_cfg
        assert init_cfg.type == 'Pretrained'
        assert init_cfg.prefix == 'backbone.'
        init_cfg.checkpoint = checkpoint
        if path.name.startswith('mask-rcnn'):
            # The whole detector: its init_weights loads the backbone.
            from mmdet.registry import MODELS as DETECTORS

            with DefaultScope.overwrite_default_scope('mmdet'):
                detector = DETECTORS.build(cfg.model)
            detector.init_weights()
            backbone = detector.backbone
        else:
            backbone = MODELS.build(cfg.model.backbone)
            backbone.init_weights()
        with torch.no_grad():
            features = backbone.eval()(images)
        for stage, feature in zip(backbone.out_indices, features):
            torch.testing.assert_close(feature, expected[stage])
