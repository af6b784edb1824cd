# Mask R-CNN 1x on COCO, mmdet's R-50 recipe with an ACmix-ResNet-50 backbone.
# No ACmix-ResNet ImageNet weights were ever released: convert your own
# (official main.py) with tools/model_converters/acmix_resnet2mmacmix.py,
# or set init_cfg=None to train from scratch.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/acmix-r50_in1k_mmacmix.pth',
            prefix='backbone.',
        ),
    )
)
