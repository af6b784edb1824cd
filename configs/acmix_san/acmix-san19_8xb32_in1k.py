# ACmix-SAN-19 on ImageNet-1k: the recipe of the patchwise SAN, as for
# ACmix-SAN-10.
_base_ = './acmix-san10_8xb32_in1k.py'

model = dict(backbone=dict(arch=19))
