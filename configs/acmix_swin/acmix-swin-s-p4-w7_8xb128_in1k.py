# ACmix-Swin-S on ImageNet-1k: the official Swin recipe, as for ACmix-Swin-T,
# with the Swin-S depths and stochastic depth 0.3.
_base_ = './acmix-swin-t-p4-w7_8xb128_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.3))
