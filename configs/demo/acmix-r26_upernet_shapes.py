# UperNet with an ACmix-ResNet-26 backbone on the semantic twin of the
# synthetic shapes data (ADE20K layout, label 0 = background, kept as a
# class: reduce_zero_label=False), sized for a CPU: 128x128 images, a
# 128-channel UperNet head. Everything else is mmseg's UperNet recipe.
# Generate the data with `python -m mmacmix.demo --data-only`, then
#   python tools/train.py configs/demo/acmix-r26_upernet_shapes.py
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

data_root = 'data/shapes/'
classes = ('background', 'circle', 'square', 'triangle', 'star')
palette = [
    [0, 0, 0],
    [220, 20, 60],
    [0, 130, 200],
    [255, 200, 0],
    [60, 180, 75],
]
crop_size = (128, 128)
max_iters = 1000
head_channels = 128
# One process on a CPU: plain BN (SyncBN needs a GPU process group).
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=26,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        norm_eval=False,
    ),
    decode_head=dict(
        channels=head_channels,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
    ),
    auxiliary_head=dict(
        channels=head_channels // 2,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
    ),
)

metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
# mmseg's ADE20KDataset only accepts subsets of ADE20K's 150 classes; the
# generic dataset reads the same layout with our own classes.
dataset = dict(
    type='BaseSegDataset',
    img_suffix='.jpg',
    seg_map_suffix='.png',
    data_root=data_root + 'ade',
    metainfo=metainfo,
    reduce_zero_label=False,
)
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(**dataset, pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(**dataset, pipeline=test_pipeline),
)
test_dataloader = val_dataloader

train_cfg = dict(max_iters=max_iters, val_interval=max_iters // 2)
# From scratch, short: AdamW with a short warm-up, then poly decay.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.01),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='PolyLR',
        eta_min=1e-5,
        power=0.9,
        begin=50,
        end=max_iters,
        by_epoch=False,
    ),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters // 2, max_keep_ckpts=1),
)
randomness = dict(seed=0, deterministic=True)
