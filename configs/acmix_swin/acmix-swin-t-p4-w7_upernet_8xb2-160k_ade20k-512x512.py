# UperNet, ACmix-Swin-T backbone, ADE20K 512x512, 160k iterations: mmseg's
# Swin-T recipe, backbone swapped.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_'
    '8xb2-160k_ade20k-512x512.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

pretrained = 'checkpoints/acmix-swin-t_in1k_mmacmix.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSwinTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        with_cp=False,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.'
        ),
    ),
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
