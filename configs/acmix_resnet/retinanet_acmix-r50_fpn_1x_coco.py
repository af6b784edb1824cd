# RetinaNet 1x on COCO: mmdet's R-50 recipe (SGD lr 0.01, FPN from stage 2
# with extra convs on the input) with an ACmix-ResNet-50 backbone.
# No ACmix-ResNet ImageNet weights were ever released: convert your own
# (official main.py) with tools/model_converters/acmix_resnet2mmacmix.py,
# or set init_cfg=None to train from scratch.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=50,
        # The FPN starts at stage 2 (start_level=1) but keeps mmdet's four
        # inputs, as mmdet's R-50 config does.
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
