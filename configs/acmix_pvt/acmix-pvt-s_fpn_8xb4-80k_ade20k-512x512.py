# Semantic FPN, ACmix-PVT-S backbone, ADE20K 512x512, 80k iterations: PVT's
# segmentation protocol as mmseg ships it for the PVT-S-sized Twins-PCPVT-S
# (AdamW lr 1e-4, weight decay 1e-4, FPN over the four stages), backbone
# swapped.
_base_ = [
    'mmseg::twins/twins_pcpvt-s_fpn_fpnhead_8xb4-80k_ade20k-512x512.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

# python tools/model_converters/pvt2acmix.py pvt_small.pth <this path>
pretrained = 'checkpoints/acmix-pvt-s_from-pvt-s-in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixPVT',
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.'
        ),
    )
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
