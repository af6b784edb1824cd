# UperNet with an X-volution ResNet-50 (X-volution in stage 3, as the paper
# found best): mmseg's UperNet R-50 ADE20K 160k recipe with only the backbone
# swapped.
#
# mmseg's base uses ResNetV1c (deep 3x3 stem, open-mmlab://resnet50_v1c
# weights); XVolutionResNet is ResNet v1.5 with torchvision's 7x7 stem, so it
# starts from torchvision's ImageNet ResNet-50, converted with
#   python tools/model_converters/resnet2xvolution.py \
#       resnet50-0676ba61.pth checkpoints/xvolution-r50_from-torchvision.pth
# and model.pretrained (which would feed ResNetV1c weights) is unset.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmacmix.XVolutionResNet',
        depth=50,
        xvolution_stages=(False, False, True, False),
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/xvolution-r50_from-torchvision.pth',
            prefix='backbone.',
        ),
    ),
)
