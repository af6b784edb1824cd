# Mask R-CNN, ACmix-PVT-S backbone, 1x: the recipe of the PVT-T config
# (the PVT authors use the same settings for PVT-S).
_base_ = './mask-rcnn_acmix-pvt-t_fpn_1x_coco.py'

# python tools/model_converters/pvt2acmix.py pvt_small.pth <this path>
pretrained = 'checkpoints/acmix-pvt-s_from-pvt-s-in1k.pth'
model = dict(backbone=dict(arch='small', init_cfg=dict(checkpoint=pretrained)))
