# mmseg's UperNet R-50 (ResNetV1c) 160k on ADE20K with ACmix in place of the
# 3x3 convs of stages 2-4. Every other layer still starts from OpenMMLab's
# ImageNet ResNet-50 V1c; the ACmix ops start fresh.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='mmacmix.ACmix'),
        stage_with_dcn=(False, True, True, True),
    )
)
