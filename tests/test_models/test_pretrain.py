"""Pretraining with mmpretrain: released classifiers converted for it, and
its Runner checkpoints as pretrained weights of our detection configs."""

import math
import runpy
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

from mmacmix.checkpoint import read_checkpoint, state_dict_of
from mmacmix.models import convert_acmix_swin
from mmacmix.registry import MODELS

REPO = Path(__file__).resolve().parents[2]
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
    convert = runpy.run_path(str(SWIN_CONVERTER))['main']
    convert([str(src), str(dst), '--keep-classifier'])

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


def build_from_config(name: str):
    """The classifier and optimiser wrapper of an ImageNet config."""
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    cfg = Config.fromfile(str(CONFIG_ROOT / name))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(cfg.model)
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return cfg, model, optim_wrapper


def test_acmix_resnet_schedule_and_decay_are_the_official_ones():
    from mmengine.registry import PARAM_SCHEDULERS

    cfg, model, optim_wrapper = build_from_config(
        'acmix_resnet/acmix-r50_8xb16_in1k.py'
    )
    # ResNet/main.py: SGD decaying every parameter, batch 128 at lr 0.1.
    assert cfg.train_dataloader.batch_size * 8 == 128
    assert cfg.train_cfg.max_epochs == 90
    decays = {group['weight_decay'] for group in optim_wrapper.param_groups}
    assert decays == {1e-4}
    base_lr, epochs, length = 0.1, 90, 4  # iterations per epoch
    schedulers = [
        PARAM_SCHEDULERS.build(
            dict(scheduler, epoch_length=length),
            default_args=dict(optimizer=optim_wrapper),
        )
        for scheduler in cfg.param_scheduler
    ]
    ours = []
    for _ in range(epochs * length):
        ours.append(optim_wrapper.param_groups[0]['lr'])
        for scheduler in schedulers:
            scheduler.step()

    def official(epoch: int, step: int) -> float:
        # adjust_learning_rate_iter_warmup, lr_scheduler='cosine'
        if epoch < 5:
            done = (1 + step + epoch * length) / (5 * length)
            return base_lr / 4 + 3 * base_lr / 4 * done
        done = ((epoch - 5) * length + step) / ((epochs - 5) * length)
        return 0.5 * base_lr * (1 + math.cos(math.pi * done))

    expected = [official(*divmod(t, length)) for t in range(len(ours))]
    warmup = 5 * length
    # Both warm-ups rise linearly to lr at their last iteration, MMEngine's
    # from lr / 4, the official one from one iteration's rise above it: they
    # differ by less than that rise (1.5e-6 at ImageNet's 10k iterations
    # per epoch). The cosine decay is the official one.
    rise = 3 * base_lr / 4 / warmup
    assert ours[0] == pytest.approx(base_lr / 4)
    assert ours[warmup - 1] == pytest.approx(base_lr)
    assert expected[warmup - 1] == pytest.approx(base_lr)
    gaps = [b - a for a, b in zip(ours[:warmup], expected[:warmup])]
    assert 0 <= min(gaps) and max(gaps) <= rise + 1e-12
    assert ours[warmup:] == pytest.approx(expected[warmup:], abs=1e-9)


def test_acmix_swin_decays_what_the_official_training_decays():
    _, model, optim_wrapper = build_from_config(
        'acmix_swin/acmix-swin-t-p4-w7_8xb128_in1k.py'
    )
    decay = {
        id(param): group['weight_decay']
        for group in optim_wrapper.param_groups
        for param in group['params']
    }
    rates = [
        param
        for name, param in model.named_parameters()
        if name.endswith(('rate1', 'rate2'))
    ]
    assert len(rates) == 2 * 12  # every block of Swin-T
    assert {decay[id(rate)] for rate in rates} == {0.0}
    for name, param in model.backbone.named_parameters():
        # Swin-Transformer/optimizer.py set_weight_decay, with the model's
        # no_weight_decay_keywords.
        skip = (
            param.ndim == 1
            or name.endswith('.bias')
            or 'relative_position_bias_table' in name
        )
        assert decay[id(param)] == (0.0 if skip else 0.05), name


def test_one_reader_takes_every_checkpoint_format(tmp_path):
    weights = {
        'conv1.weight': torch.randn(4, 3, 1, 1),
        'fc.bias': torch.ones(2),
    }
    formats = {
        'Runner, mmpretrain': {
            'meta': {'epoch': 1},
            'state_dict': weights,
            'message_hub': {'log_scalars': {}},
            'optimizer': {'state': {}},
        },
        'official ResNet main.py': {
            'epoch': 90,
            'state_dict': {f'module.{k}': v for k, v in weights.items()},
            'best_acc1': torch.tensor(80.0),
        },
        'official Swin release': {'model': weights, 'epoch': 299},
        'torchvision': weights,
    }
    for name, checkpoint in formats.items():
        path = str(tmp_path / 'checkpoint.pth')
        torch.save(checkpoint, path)
        found = state_dict_of(read_checkpoint(path), path)
        assert found.keys() == weights.keys(), name
        assert all(torch.equal(found[k], weights[k]) for k in weights), name
    with pytest.raises(ValueError, match="'x.pth' holds no state dict"):
        state_dict_of({'epoch': 3, 'optimizer': {}}, 'x.pth')


def test_swin_classifier_checkpoint_loads_into_every_swin_t_det_seg_config(
    tmp_path,
):
    # An ImageNet classifier's backbone has the last output norm only; the
    # detectors' (out_indices 0-3) get identity norms for the others.
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS

    torch.manual_seed(0)
    cfg = Config.fromfile(
        str(CONFIG_ROOT / 'acmix_swin/acmix-swin-t-p4-w7_8xb128_in1k.py')
    )
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = PRETRAIN_MODELS.build(cfg.model)
    classifier.init_weights()
    trained = classifier.backbone.eval()
    with torch.no_grad():
        trained.norm3.weight.uniform_(0.5, 1.5)
        trained.norm3.bias.uniform_(-0.5, 0.5)
    checkpoint = str(tmp_path / 'epoch_300.pth')
    torch.save({'meta': {}, 'state_dict': classifier.state_dict()}, checkpoint)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = trained(images)[0]

    backbones = [
        Config.fromfile(str(path)).model.backbone
        for path in sorted((CONFIG_ROOT / 'acmix_swin').glob('*.py'))
        if '_in1k' not in path.name
    ]
    backbones = [cfg for cfg in backbones if cfg.arch == 'tiny']
    assert len(backbones) == 4  # Mask R-CNN 1x and 3x, RetinaNet, UperNet
    # What decides the keys a checkpoint must have: each such layout once.
    layouts = {
        (cfg.type, cfg.window_size, tuple(cfg.out_indices))
        + (cfg.init_cfg.type, cfg.init_cfg.prefix): cfg
        for cfg in backbones
    }
    assert {layout[2] for layout in layouts} == {(0, 1, 2, 3), (1, 2, 3)}
    for backbone_cfg in layouts.values():
        backbone_cfg.init_cfg.checkpoint = checkpoint
        backbone = MODELS.build(backbone_cfg)
        backbone.init_weights()
        state = backbone.state_dict()
        for key, value in trained.state_dict().items():
            assert torch.equal(state[key], value), key
        for stage in backbone.out_indices[:-1]:
            ones = torch.ones(96 << stage)
            assert torch.equal(state[f'norm{stage}.weight'], ones)
            assert not state[f'norm{stage}.bias'].any()
        with torch.no_grad():
            features = backbone.eval()(images)
        torch.testing.assert_close(features[-1], expected)
