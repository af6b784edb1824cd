"""Every config under configs/ parses, builds, trains one step and predicts.

Each model is built from its config exactly, with three CPU-only changes:
SyncBN becomes BN, AmpOptimWrapper becomes OptimWrapper (both need a GPU),
and the pretrained backbone checkpoint (not available offline) is dropped.
The data are the tiny synthetic shapes dataset in COCO or ADE20K format,
read by the dataset class the config uses, through a short pipeline at the
generated 128x128 size instead of the config's 1333x800 / 512x512 one.
The RPN and RoI sampling sizes of two-stage detectors are reduced so that a
step takes seconds; the heads themselves are unchanged. ImageNet configs
read shape images in ImageNet layout through the config's own dataset class
and pipelines, whose crop sizes are scaled from 224 to 64.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from mmacmix.datasets import SHAPE_CLASSES

CONFIG_ROOT = Path(__file__).resolve().parents[2] / 'configs'
CONFIGS = sorted(
    p for p in CONFIG_ROOT.rglob('*.py') if '_base_' not in p.parts
)


def cpu_config(path: Path) -> Config:
    """Loads a config and makes the CPU-only changes listed above."""
    cfg = Config.fromfile(str(path))

    def visit(node):
        if isinstance(node, dict):
            if node.get('type') == 'SyncBN':
                node['type'] = 'BN'
            init_cfg = node.get('init_cfg')
            if (
                isinstance(init_cfg, dict)
                and init_cfg.get('type') == 'Pretrained'
            ):
                node['init_cfg'] = None
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(cfg.model)
    if cfg.model.get('pretrained'):
        cfg.model.pretrained = None
    if cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
    return cfg


def build_model(cfg: Config):
    if cfg.default_scope == 'mmpretrain':
        from mmpretrain.registry import MODELS

        # As the Runner does: mmpretrain configs set it beside the model.
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    elif cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS

        train_cfg = cfg.model.get('train_cfg', {})
        if 'rpn_proposal' in train_cfg:
            train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
            train_cfg.rcnn.sampler.num = 64
    else:
        from mmseg.registry import MODELS

        cfg.model.data_preprocessor.size = (128, 128)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def detection_data(root: str, split: str, with_mask: bool):
    from mmdet.datasets import CocoDataset

    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask),
        dict(type='Resize', scale=(128, 128), keep_ratio=True),
        dict(type='PackDetInputs'),
    ]
    return CocoDataset(
        data_root=f'{root}/coco',
        ann_file=f'annotations/instances_{split}.json',
        data_prefix=dict(img=f'{split}/'),
        metainfo=dict(classes=SHAPE_CLASSES),
        pipeline=pipeline,
    )


def segmentation_data(root: str, split: str):
    from mmseg.datasets import ADE20KDataset

    folder = {'train': 'training', 'val': 'validation'}[split]
    return ADE20KDataset(
        data_root=f'{root}/ade',
        data_prefix=dict(
            img_path=f'images/{folder}', seg_map_path=f'annotations/{folder}'
        ),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs'),
        ],
    )


def classification_data(root: str, split: str, cfg: Config):
    from mmpretrain.registry import DATASETS

    loader = cfg.train_dataloader if split == 'train' else cfg.val_dataloader
    dataset = copy.deepcopy(loader.dataset)
    for transform in dataset.pipeline:
        for key in ('scale', 'crop_size'):
            if isinstance(transform.get(key), int):
                transform[key] = transform[key] * 64 // 224
    dataset.update(data_root=root)
    if dataset.type == 'CustomDataset':
        # The demo's shape crops: the same layout, named by the config.
        assert dataset.ann_file == f'meta/{split}.txt'
        assert dataset.data_prefix == f'{split}/'
    else:
        dataset.update(split=split)
    return DATASETS.build(dataset)


@pytest.mark.parametrize(
    'path', CONFIGS, ids=[str(p.relative_to(CONFIG_ROOT)) for p in CONFIGS]
)
def test_config_trains_one_step_and_predicts(path, shapes_root, imagenet_root):
    torch.manual_seed(0)
    cfg = cpu_config(path)
    assert 'mmacmix' in cfg.custom_imports['imports']
    init_default_scope(cfg.default_scope)
    model = build_model(cfg)
    is_classifier = cfg.default_scope == 'mmpretrain'
    is_detector = cfg.default_scope == 'mmdet'
    if is_classifier:
        train_set = classification_data(imagenet_root, 'train', cfg)
        val_set = classification_data(imagenet_root, 'val', cfg)
    elif is_detector:
        with_mask = 'mask_head' in cfg.model.get('roi_head', {})
        train_set = detection_data(shapes_root, 'train', with_mask)
        val_set = detection_data(shapes_root, 'val', with_mask)
    else:
        train_set = segmentation_data(shapes_root, 'train')
        val_set = segmentation_data(shapes_root, 'val')

    backbone = model.backbone
    trainable = {
        n: p.detach().clone()
        for n, p in backbone.named_parameters()
        if p.requires_grad
    }
    optim_wrapper = build_optim_wrapper(
        model, copy.deepcopy(cfg.optim_wrapper)
    )
    model.train()
    losses = model.train_step(
        pseudo_collate([train_set[0], train_set[1]]), optim_wrapper
    )
    assert losses and all(math.isfinite(v.item()) for v in losses.values())
    assert any(k.startswith('loss') for k in losses)
    # Zero-initialised residual ends legitimately get no gradient in the
    # first step; the stem and every stage must move.
    changed = {
        n
        for n, p in backbone.named_parameters()
        if n in trainable and not torch.equal(p, trainable[n])
    }
    first = next(iter(trainable))
    assert first in changed, f'{first} (first trainable) did not move'
    stages = {n.split('.')[0] + '.' + n.split('.')[1] for n in trainable}
    still = [s for s in stages if not any(c.startswith(s) for c in changed)]
    assert not still, f'no parameter of {still} was updated'

    model.eval()
    sample = val_set[0]
    with torch.no_grad():
        [result] = model.test_step(pseudo_collate([sample]))
    height, width = sample['data_samples'].ori_shape
    if is_classifier:
        scores = result.pred_score
        assert scores.shape == (model.head.num_classes,)
        assert torch.allclose(scores.sum(), torch.tensor(1.0))
        assert result.pred_label.item() == scores.argmax().item()
    elif is_detector:
        pred = result.pred_instances
        assert pred.bboxes.ndim == 2 and pred.bboxes.shape[1] == 4
        assert len(pred.scores) == len(pred.labels) == len(pred.bboxes)
        assert torch.isfinite(pred.bboxes).all()
        assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
        if 'masks' in pred:
            assert pred.masks.shape == (len(pred.bboxes), height, width)
    else:
        seg = result.pred_sem_seg.data
        assert seg.shape == (1, height, width)
        assert seg.min() >= 0 and seg.max() < model.decode_head.num_classes
