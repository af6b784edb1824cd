"""mmdet, mmseg and mmpretrain build mmacmix classes by scoped name, like
any plugin."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mmacmix.models import ACmix, ACmixResNet
from mmacmix.registry import MODELS


def test_registry_is_a_child_of_mmengine_models():
    from mmengine.registry import MODELS as ROOT

    assert MODELS.parent is ROOT and ROOT.children['mmacmix'] is MODELS
    assert MODELS.get('ACmixResNet') is ACmixResNet
    assert MODELS.get('ACmix') is ACmix


def test_mmdet_mmseg_mmpretrain_build_by_scoped_name_without_importing_us():
    # A fresh interpreter: mmengine must find mmacmix from the scope prefix
    # alone, as it does for a config without custom_imports.
    script = textwrap.dedent("""
        from mmengine.registry import DefaultScope
        from mmdet.registry import MODELS as DET
        from mmseg.registry import MODELS as SEG
        from mmpretrain.registry import MODELS as PRE
        import sys
        assert 'mmacmix' not in sys.modules
        cfg = dict(type='mmacmix.ACmixResNet', depth=26, out_indices=(3,))
        for scope, registry in (('mmdet', DET), ('mmseg', SEG),
                                ('mmpretrain', PRE)):
            with DefaultScope.overwrite_default_scope(scope):
                model = registry.build(cfg)
            print(scope, type(model).__module__, type(model).__name__)
    """)
    out = subprocess.run(
        [sys.executable, '-c', script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\n')
    assert out[:3] == [
        'mmdet mmacmix.models.acmix_resnet ACmixResNet',
        'mmseg mmacmix.models.acmix_resnet ACmixResNet',
        'mmpretrain mmacmix.models.acmix_resnet ACmixResNet',
    ]


def test_hooks_build_by_scoped_name_without_importing_us():
    # What a config run by `mim train` relies on: MMEngine's HOOKS finds
    # both hooks from the scope prefix, and the checkpoint hook keeps the
    # arguments of the CheckpointHook it stands in for.
    script = textwrap.dedent("""
        import sys
        from mmengine.registry import HOOKS
        assert 'mmacmix' not in sys.modules
        resume = HOOKS.build(dict(type='mmacmix.ExactResumeHook'))
        checkpoint = HOOKS.build(dict(
            type='mmacmix.AtomicCheckpointHook', interval=7, by_epoch=False,
            max_keep_ckpts=2))
        print(type(resume).__module__, type(resume).__name__)
        print(type(checkpoint).__name__, checkpoint.interval,
              checkpoint.by_epoch, checkpoint.max_keep_ckpts)
    """)
    out = subprocess.run(
        [sys.executable, '-c', script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\n')
    assert out[:2] == [
        'mmacmix.apis.hooks ExactResumeHook',
        'AtomicCheckpointHook 7 False 2',
    ]


# Small variants of every backbone, with the channels of their last stage;
# no stochastic depth, so that two forwards in training mode agree.
CLASSIFIER_BACKBONES = {
    'ACmixResNet': (dict(depth=26), 2048),
    'ACmixSwinTransformer': (
        dict(
            arch=dict(
                embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)
            ),
            drop_path_rate=0.0,
        ),
        256,
    ),
    'XVolutionResNet': (dict(depth=18), 512),
    'ACmixPVT': (
        dict(
            arch=dict(
                embed_dims=(16, 32, 64, 64),
                depths=(1, 1, 1, 1),
                num_heads=(1, 1, 1, 1),
            ),
            drop_path_rate=0.0,
        ),
        64,
    ),
    'ACmixSAN': (dict(arch=10), 2048),
}


@pytest.mark.parametrize('name', sorted(CLASSIFIER_BACKBONES))
def test_every_backbone_trains_inside_mmpretrain_image_classifier(name):
    # mmpretrain's usual classifier: last stage -> global average pooling
    # -> linear head, built in mmpretrain's scope from the scoped name.
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    from mmpretrain.structures import DataSample

    torch.manual_seed(0)
    kwargs, channels = CLASSIFIER_BACKBONES[name]
    cfg = dict(
        type='ImageClassifier',
        backbone=dict(type=f'mmacmix.{name}', out_indices=(3,), **kwargs),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=5,
            in_channels=channels,
            loss=dict(type='CrossEntropyLoss'),
        ),
    )
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(cfg)
    assert type(model.backbone) is MODELS.get(name)
    model.init_weights()
    images = torch.randn(2, 3, 61, 67)
    labels = torch.tensor([1, 4])
    samples = [DataSample().set_gt_label(label) for label in labels]

    logits = model(images, mode='tensor')
    assert logits.shape == (2, 5)
    # The head sees the pooled last stage and nothing else.
    pooled = model.backbone(images)[-1].mean(dim=(2, 3))
    torch.testing.assert_close(logits, model.head.fc(pooled))
    losses = model(images, samples, mode='loss')
    torch.testing.assert_close(losses['loss'], F.cross_entropy(logits, labels))
    losses['loss'].backward()
    stem = next(model.backbone.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0
