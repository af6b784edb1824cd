"""Convert an official ACmix-ResNet checkpoint for ``mmacmix.ACmixResNet``.

Usage: python tools/model_converters/acmix_resnet2mmacmix.py SRC DST [--force]
"""

from mmacmix.cli import convert_cli
from mmacmix.models import convert_acmix_resnet


def main(argv: list[str] | None = None) -> None:
    convert_cli(convert_acmix_resnet, __doc__.splitlines()[0], argv)


if __name__ == '__main__':
    main()
