# UperNet on ADE20K 512x512, 160k iterations: mmseg's UperNet R-50 recipe
# with an ACmix-ResNet-50 backbone.
#
# mmseg's base uses ResNetV1c (deep 3x3 stem, open-mmlab://resnet50_v1c
# weights, plain strides for UperNet); ACmixResNet is ResNet v1.5 with
# torchvision's 7x7 stem, as the official ACmix models, so model.pretrained
# (which would feed ResNetV1c weights) is unset and the backbone loads
# converted ACmix weights (tools/model_converters/acmix_resnet2mmacmix.py)
# or trains from scratch with init_cfg=None. Output channels and strides
# (256-2048 at 4-32) match what UperNet expects.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=50,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/acmix-r50_in1k_mmacmix.pth',
            prefix='backbone.',
        ),
    ),
)
