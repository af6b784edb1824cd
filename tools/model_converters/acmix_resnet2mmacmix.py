"""Convert an official ACmix-ResNet checkpoint for ``mmacmix.ACmixResNet``.

Usage: python tools/model_converters/acmix_resnet2mmacmix.py SRC DST [--force]
"""

from mmacmix.cli import convert_cli
from mmacmix.models import convert_acmix_resnet

if __name__ == '__main__':
    convert_cli(convert_acmix_resnet, __doc__.splitlines()[0])
