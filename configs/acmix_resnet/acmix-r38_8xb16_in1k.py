# ACmix-ResNet-38 on ImageNet-1k: the recipe of the official training code,
# as for ACmix-ResNet-50.
_base_ = './acmix-r50_8xb16_in1k.py'

model = dict(backbone=dict(depth=38))
