# Mask R-CNN, ACmix-Swin-T backbone, 3x with multi-scale and crop
# augmentation: mmdet's Swin-T recipe, backbone swapped.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

pretrained = 'checkpoints/acmix-swin-t_in1k_mmacmix.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSwinTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.'
        ),
    )
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
