# UperNet, ACmix-Swin-S backbone, ADE20K 512x512, 160k iterations: mmseg's
# Swin-S recipe, backbone swapped.
_base_ = (
    'mmseg::swin/swin-small-patch4-window7-in1k-pre_upernet_'
    '8xb2-160k_ade20k-512x512.py'
)
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

pretrained = 'checkpoints/acmix-swin-s_in1k_mmacmix.pth'
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSwinTransformer',
        arch='small',
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
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'attn.rate1': dict(decay_mult=0.0),
            'attn.rate2': dict(decay_mult=0.0),
        }
    )
)
