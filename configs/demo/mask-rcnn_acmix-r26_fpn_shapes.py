# Mask R-CNN with an ACmix-ResNet-26 backbone on the synthetic shapes data,
# sized to train from scratch on a laptop CPU in minutes: 128x128 images,
# stages 2-4 only (strides 8-32), a 64-channel FPN and slim RoI heads (the
# RoI heads dominate a CPU step with mmdet's defaults). Everything else is
# mmdet's Mask R-CNN recipe. `python -m mmacmix.demo` generates the data
# (data/shapes) and runs this config; tools/train.py runs it once the data
# exist.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

data_root = 'data/shapes/'
classes = ('circle', 'square', 'triangle', 'star')
image_size = (128, 128)
fpn_channels = 64
max_iters = 750
val_interval = 250

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=26,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
    ),
    neck=dict(
        in_channels=[512, 1024, 2048], out_channels=fpn_channels, num_outs=4
    ),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        anchor_generator=dict(scales=[4], strides=[8, 16, 32, 64]),
    ),
    roi_head=dict(
        bbox_roi_extractor=dict(
            out_channels=fpn_channels, featmap_strides=[8, 16, 32]
        ),
        bbox_head=dict(
            in_channels=fpn_channels,
            fc_out_channels=256,
            num_classes=len(classes),
        ),
        mask_roi_extractor=dict(
            out_channels=fpn_channels, featmap_strides=[8, 16, 32]
        ),
        mask_head=dict(
            num_convs=2,
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            num_classes=len(classes),
        ),
    ),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(sampler=dict(num=64)),
    ),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20),
    ),
)

metainfo = dict(classes=classes)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=(
            'img_id',
            'img_path',
            'ori_shape',
            'img_shape',
            'scale_factor',
        ),
    ),
]
# num_workers=0: data loading is cheap here and the two cores are busy
# with the model; it also keeps runs bit-for-bit reproducible.
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        data_root=data_root + 'coco/',
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root + 'coco/',
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(
    ann_file=data_root + 'coco/annotations/instances_val.json'
)
test_evaluator = val_evaluator

train_cfg = dict(
    _delete_=True,
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=val_interval,
)
# From scratch: AdamW with a short warm-up and a cosine decay converges
# much faster than the SGD 1x recipe meant for ImageNet-initialised nets.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='CosineAnnealingLR',
        by_epoch=False,
        begin=50,
        end=max_iters,
        eta_min=1e-5,
    ),
]
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20),
    checkpoint=dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=val_interval,
        max_keep_ckpts=1,
    ),
)
log_processor = dict(by_epoch=False, window_size=20)
randomness = dict(seed=0, deterministic=True)
