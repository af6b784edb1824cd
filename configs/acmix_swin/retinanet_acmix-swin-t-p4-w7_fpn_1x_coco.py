# RetinaNet, ACmix-Swin-T backbone, 1x: mmdet's Swin-T recipe (SGD, FPN from
# stage 2), backbone swapped.
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
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
        # Only the stages the FPN reads: an output norm of another stage
        # would get no gradient (the converted norm0 is dropped on loading).
        out_indices=(1, 2, 3),
        with_cp=False,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.'
        ),
    )
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
