# Mask R-CNN, ACmix-Swin-S backbone, 3x multi-scale and crop, mixed precision
# (needs a GPU): mmdet's Swin-S recipe, backbone swapped.
_base_ = 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

pretrained = 'checkpoints/acmix-swin-s_in1k_mmacmix.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSwinTransformer',
        arch='small',
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
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'attn.rate1': dict(decay_mult=0.0),
            'attn.rate2': dict(decay_mult=0.0),
        }
    )
)
