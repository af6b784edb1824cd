# ACmix-PVT-S on ImageNet-1k: the recipe of the PVT-T config.
_base_ = './acmix-pvt-t_8xb128_in1k.py'

model = dict(backbone=dict(arch='small'))
