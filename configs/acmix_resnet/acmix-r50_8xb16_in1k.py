# ACmix-ResNet-50 on ImageNet-1k with the recipe of the official training
# code (LeapLabTHU/ACmix, ResNet/main.py and its README): 90 epochs, SGD
# (lr 0.1, momentum 0.9, weight decay 1e-4 on every parameter) for a total
# batch of 128, 5 warm-up epochs rising per iteration from lr / 4, then a
# cosine decay to 0, label smoothing 0.1, random-resized 224 crops and
# flips, no residual branch starting at zero. Everything else is
# mmpretrain's ResNet-50 recipe with label smoothing. (The official loss
# spreads the smoothing over the 999 wrong classes, mmpretrain's over all
# 1000: the true class keeps 0.9001 instead of 0.9.)
_base_ = 'mmpretrain::resnet/resnet50_8xb32-lbs_in1k.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixResNet',
        depth=50,
        out_indices=(3,),
        zero_init_residual=False,
    )
)

train_dataloader = dict(batch_size=16)
val_dataloader = dict(batch_size=16)
test_dataloader = dict(batch_size=16)

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.25,
        by_epoch=True,
        end=5,
        convert_to_iter_based=True,
    ),
    dict(
        type='CosineAnnealingLR',
        eta_min=0.0,
        by_epoch=True,
        begin=5,
        end=90,
        convert_to_iter_based=True,
    ),
]
train_cfg = dict(max_epochs=90)
auto_scale_lr = dict(base_batch_size=128)
