# ACmix-PVT-T on ImageNet-1k: PVT's protocol (DeiT's augmentation, 300
# epochs, AdamW lr 1e-3 for 8 GPUs x 128 images, weight decay 0.05, 5
# warm-up epochs, cosine decay, label smoothing 0.1) as mmpretrain ships it
# for the PVT-shaped Twins-PCPVT, which adds gradient clipping at 5; only
# the backbone is swapped. The final norm is the PVT classifier's; the
# detection backbones drop it when they load the result.
_base_ = [
    'mmpretrain::twins/twins-pcpvt-small_8xb128_in1k.py',
    '../_base_/acmix_no_decay.py',
]
custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixPVT',
        arch='tiny',
        drop_path_rate=0.1,  # PVT's for T and S
        out_indices=(3,),
        final_norm=True,
    )
)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
