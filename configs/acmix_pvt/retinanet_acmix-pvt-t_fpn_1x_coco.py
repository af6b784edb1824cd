# RetinaNet, ACmix-PVT-T backbone, 1x: mmdet's PVT-T recipe (AdamW lr 1e-4,
# weight decay 1e-4, FPN over all four stages), backbone swapped.
_base_ = [
    'mmdet::pvt/retinanet_pvt-t_fpn_1x_coco.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

# The plain PVT-T ImageNet release that mmdet's recipe loads, converted:
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
    )
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
