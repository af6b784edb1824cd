# ACmix-Swin-T on ImageNet-1k: the official Swin recipe, as the ACmix
# release trained it (8 GPUs x 128 images, 300 epochs, AdamW lr 1e-3 and
# weight decay 0.05, 20 warm-up epochs, cosine decay, RandAugment, Mixup,
# CutMix, random erasing, label smoothing 0.1, gradient clipping at 5),
# which is mmpretrain's Swin-T config; only the backbone is swapped.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    '../_base_/acmix_no_decay.py',
]

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSwinTransformer',
        arch='tiny',
        window_size=7,
        drop_path_rate=0.2,
        out_indices=(3,),
    )
)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = dict(batch_size=128)

# The ACmix mixing rates join the recipe's no-decay keys.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys=_base_.acmix_no_decay))
