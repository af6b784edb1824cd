# RetinaNet, ACmix-PVT-S backbone, 1x: mmdet's PVT-S recipe, backbone
# swapped (as in the PVT-T config).
_base_ = './retinanet_acmix-pvt-t_fpn_1x_coco.py'

# python tools/model_converters/pvt2acmix.py pvt_small.pth <this path>
pretrained = 'checkpoints/acmix-pvt-s_from-pvt-s-in1k.pth'
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)))
