# mmdet's Mask R-CNN R-50 1x with ACmix in place of the 3x3 convs of stages
# 2-4 (the slot mmdet's ResNet uses for DCN). Every other layer still starts
# from torchvision's ImageNet ResNet-50; the ACmix ops start fresh.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='mmacmix.ACmix'),
        stage_with_dcn=(False, True, True, True),
    )
)
