# Mask R-CNN with an X-volution (SA) ResNet-50: beside every 3x3
# convolution of stage 3, true global multi-head self-attention followed by
# batch norm, the paper's form behind its COCO result (+1.7 box AP over
# ResNet-50). Otherwise as the PSSA config: mmdet's Mask R-CNN R-50-FPN 1x
# recipe with only the backbone swapped. This form has no deployed
# single-operator form.
#
# Pretrained weights: torchvision's ImageNet ResNet-50 converted with
#   python tools/model_converters/resnet2xvolution.py --attention global \
#       resnet50-0676ba61.pth checkpoints/xvolution-sa-r50_from-torchvision.pth
_base_ = './mask-rcnn_xvolution-r50_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        attention='global',
        num_heads=4,
        init_cfg=dict(
            checkpoint='checkpoints/xvolution-sa-r50_from-torchvision.pth'
        ),
    )
)
