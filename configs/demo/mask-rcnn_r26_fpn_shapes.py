# The demo's Mask R-CNN with a plain ResNet-26 backbone: the same skeleton
# and recipe as mask-rcnn_acmix-r26_fpn_shapes.py, every ACmix op replaced by
# the 3x3 convolution it stands for. `python -m mmacmix.demo --compare`
# trains both at equal iterations: what ACmix buys and costs on this data.
_base_ = './mask-rcnn_acmix-r26_fpn_shapes.py'

model = dict(backbone=dict(acmix_stages=(False, False, False, False)))
