"""Pretraining with mmpretrain: released classifiers converted for it, and
its Runner checkpoints as pretrained weights of our detection configs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint
from test_acmix_swin import (  # the official-format reference model
    SMALL,
    RefSwinACmix,
    randomise,
    released_checkpoint,
)

from mmacmix.models import convert_acmix_swin

REPO = Path(__file__).resolve().parents[1]
SWIN_CONVERTER = REPO / 'tools/model_converters/acmix_swin2mmacmix.py'


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
