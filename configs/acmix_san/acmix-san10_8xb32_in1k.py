# ACmix-SAN-10 on ImageNet-1k with the recipe of the patchwise SAN it is
# built on (hszhao/SAN, config/imagenet/imagenet_san10_patchwise.yaml):
# 100 epochs, SGD (lr 0.1, momentum 0.9, weight decay 1e-4) for a total
# batch of 256, a cosine decay to 0 stepped per epoch, no warm-up, label
# smoothing 0.1. Everything else (random-resized 224 crops and flips,
# global average pooling, a linear classifier on the 2048 channels of
# stage 4) is mmpretrain's ResNet-50 recipe with label smoothing. The
# ACmix paper does not publish its SAN recipe; SAN's is the natural one.
# Unlike SAN, every residual branch starts at zero (the backbone's
# default): a random SAN evaluated with barely updated norm statistics
# overflows otherwise.
_base_ = 'mmpretrain::resnet/resnet50_8xb32-lbs_in1k.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.ACmixSAN',
        arch=10,
        out_indices=(3,),
    )
)

param_scheduler = dict(
    _delete_=True,
    type='CosineAnnealingLR',
    T_max=100,
    eta_min=0.0,
    by_epoch=True,
    begin=0,
    end=100,
)
train_cfg = dict(max_epochs=100)
auto_scale_lr = dict(base_batch_size=256)
