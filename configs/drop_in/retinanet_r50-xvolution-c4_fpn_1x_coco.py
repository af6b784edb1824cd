# mmdet's RetinaNet R-50 1x with X-volution in place of the 3x3 convs of
# stage 3, where the X-volution paper found it works best. Every other layer
# still starts from torchvision's ImageNet ResNet-50.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='mmacmix.XVolution'),
        stage_with_dcn=(False, False, True, False),
    )
)
