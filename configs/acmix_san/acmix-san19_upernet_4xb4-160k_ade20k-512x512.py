# UperNet on ADE20K 512x512, 160k iterations: mmseg's UperNet R-50 recipe
# with an ACmix-SAN-19 backbone.
#
# mmseg's base feeds ResNetV1c weights through model.pretrained, so that is
# unset. No ACmix-SAN ImageNet weights were ever released: train your own
# (any checkpoint whose backbone.* keys fit mmacmix.ACmixSAN, e.g. an
# mmpretrain ImageClassifier with this backbone), or set init_cfg=None to
# train from scratch. Output channels and strides (256-2048 at 4-32) are
# ResNet-50's, so the decode and auxiliary heads stay as they are.
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSAN',
        arch=19,
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        norm_eval=False,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/acmix-san19_in1k_mmacmix.pth',
            prefix='backbone.',
        ),
    ),
    decode_head=dict(in_channels=[256, 512, 1024, 2048]),
)
