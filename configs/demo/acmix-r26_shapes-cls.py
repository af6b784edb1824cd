# ACmix-ResNet-26 pretrained as a 4-class classifier on crops of the
# synthetic shapes (one per annotated shape, see mmacmix/datasets/crops.py):
# the ImageNet pretraining of a real detector, shrunk to minutes on a CPU.
# `python -m mmacmix.demo --pretrain` cuts the crops (data/shapes/cls),
# trains this config, and starts the demo's Mask R-CNN from the checkpoint
# (its backbone.* keys fit the detector's backbone exactly); tools/train.py
# runs it once the crops exist. Model and runtime are mmpretrain's ResNet
# ones with our backbone; the rest is sized for the time limit.
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/default_runtime.py',
]

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

data_root = 'data/shapes/cls/'
classes = ('circle', 'square', 'triangle', 'star')
# The crops' median side is 65 pixels: 64 keeps the scale at which the
# detector sees the shapes in its 128x128 images.
crop_size = (64, 64)
# 3 passes over the 2896 training crops at batch 32: about 3.5 minutes on
# two idle cores of the development machine, which leaves room under the
# demo's 5-minute budget for slower CPUs. The training loss still falls at
# the end: more iterations would buy top-1 with time.
max_iters = 270

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=26,
        out_indices=(3,),
    ),
    head=dict(num_classes=len(classes), topk=(1,)),
)
# The normalisation of mmdet's Mask R-CNN (the demo detector): the
# pretrained features are computed from the same inputs there.
data_preprocessor = dict(
    num_classes=len(classes),
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    to_rgb=True,
)

metainfo = dict(classes=classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size),
    dict(type='PackInputs'),
]
# num_workers=0, as in the demo detector: reproducible, and the cores are
# busy with the model.
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/train.txt',
        data_prefix='train/',
        metainfo=metainfo,
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/val.txt',
        data_prefix='val/',
        metainfo=metainfo,
        pipeline=test_pipeline,
    ),
)
val_evaluator = dict(type='Accuracy', topk=(1,))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters
)
val_cfg = dict()
test_cfg = dict()
# From scratch, as the demo detector: AdamW, a short warm-up, cosine decay.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(
        type='CosineAnnealingLR',
        by_epoch=False,
        begin=20,
        end=max_iters,
        eta_min=1e-5,
    ),
]
auto_scale_lr = dict(enable=False, base_batch_size=32)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=max_iters,
        max_keep_ckpts=1,
        save_optimizer=False,
    ),
)
log_processor = dict(by_epoch=False, window_size=10)
randomness = dict(seed=0, deterministic=True)
