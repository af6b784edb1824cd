# Mask R-CNN, ACmix-Swin-S backbone, 3x multi-scale and crop, mixed precision
# (needs a GPU): mmdet's Swin-S recipe, which is its Swin-T 3x recipe with
# the Swin-S depths, the Swin-S weights and AMP; so is this one.
_base_ = './mask-rcnn_acmix-swin-t-p4-w7_fpn_ms-crop-3x_coco.py'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/acmix-swin-s_in1k_mmacmix.pth'),
    )
)
optim_wrapper = dict(type='AmpOptimWrapper')
