# Mask R-CNN, ACmix-PVT-T backbone, 1x. mmdet ships no PVT Mask R-CNN
# recipe; this is mmdet's Mask R-CNN 1x with the PVT authors' settings for
# it (whai362/PVT detection/configs/mask_rcnn_pvt_t_fpn_1x_coco.py: AdamW
# lr 2e-4, weight decay 1e-4, FPN over the four PVT stages).
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

# python tools/model_converters/pvt2acmix.py pvt_tiny.pth <this path>
pretrained = 'checkpoints/acmix-pvt-t_from-pvt-t-in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixPVT',
        arch='tiny',
        drop_path_rate=0.1,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.'
        ),
    ),
    neck=dict(in_channels=[64, 128, 320, 512]),
)

optim_wrapper = dict(
    optimizer=dict(
        _delete_=True, type='AdamW', lr=0.0002, weight_decay=0.0001
    ),
    # The ACmix mixing rates take no weight decay.
    paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay),
)
