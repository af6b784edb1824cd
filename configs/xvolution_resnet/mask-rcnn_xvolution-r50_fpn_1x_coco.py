# Mask R-CNN with an X-volution ResNet-50 (X-volution in stage 3, as the
# paper found best): mmdet's Mask R-CNN R-50-FPN 1x recipe with only the
# backbone swapped.
#
# Pretrained weights: torchvision's ImageNet ResNet-50 converted with
#   python tools/model_converters/resnet2xvolution.py \
#       resnet50-0676ba61.pth checkpoints/xvolution-r50_from-torchvision.pth
# (both mmdet's ResNet style='pytorch' and ours are ResNet v1.5).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.XVolutionResNet',
        depth=50,
        xvolution_stages=(False, False, True, False),
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/xvolution-r50_from-torchvision.pth',
            prefix='backbone.',
        ),
    )
)
