# Mask R-CNN 1x on COCO, mmdet's R-50 recipe with an ACmix-SAN-19 backbone.
# No ACmix-SAN ImageNet weights were ever released: train your own (any
# checkpoint whose backbone.* keys fit mmacmix.ACmixSAN, e.g. an mmpretrain
# ImageClassifier with this backbone), or set init_cfg=None to train from
# scratch. Output channels and strides (256-2048 at 4-32) are ResNet-50's.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSAN',
        arch=19,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/acmix-san19_in1k_mmacmix.pth',
            prefix='backbone.',
        ),
    ),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
)
