# UperNet, ACmix-Swin-S backbone, ADE20K 512x512, 160k iterations: mmseg's
# Swin-S recipe, which is its Swin-T recipe with the Swin-S depths and
# weights; so is this one.
_base_ = './acmix-swin-t-p4-w7_upernet_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(checkpoint='checkpoints/acmix-swin-s_in1k_mmacmix.pth'),
    )
)
