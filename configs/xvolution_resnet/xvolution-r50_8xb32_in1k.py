# X-volution ResNet-50 (X-volution in stage 3) on ImageNet-1k: mmpretrain's
# standard ResNet-50 recipe (100 epochs, SGD lr 0.1 for a total batch of
# 256, steps at 30, 60 and 90), backbone swapped.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['mmacmix'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='mmacmix.XVolutionResNet',
        depth=50,
        xvolution_stages=(False, False, True, False),
        out_indices=(3,),
    )
)
