"""Convert a torchvision or OpenMMLab ResNet for ``mmacmix.XVolutionResNet``.

SRC is a torchvision state dict or an mmpretrain/mmcls/mmdet checkpoint.
X-volution goes into stage 3, as in the configs under
configs/xvolution_resnet/; the convolution branches take the ResNet's 3x3
weights and the attention branches (PSSA, or global self-attention with
--attention global) start at their initialisation, switched off.
"""

from mmacmix.cli import convert_cli
from mmacmix.models import XVolutionResNet, convert_resnet_to_xvolution
from mmacmix.models.xvolution import ATTENTIONS


def main(argv: list[str] | None = None) -> None:
    convert_cli(
        convert_resnet_to_xvolution,
        __doc__.splitlines()[0],
        argv,
        extra_arguments={
            '--depth': dict(
                type=int,
                choices=sorted(XVolutionResNet.arch_settings),
                help='checked against the checkpoint; read from it if omitted',
            ),
            '--attention': dict(
                choices=ATTENTIONS,
                default='pssa',
                help="the X-volutions' attention branch (default: pssa; "
                'global: X-volution (SA))',
            ),
        },
    )


if __name__ == '__main__':
    main()
