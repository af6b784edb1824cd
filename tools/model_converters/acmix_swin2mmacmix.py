"""Convert an official ACmix-Swin checkpoint for ``ACmixSwinTransformer``.

Usage: python tools/model_converters/acmix_swin2mmacmix.py SRC DST [--force]
"""

from mmacmix.cli import convert_cli
from mmacmix.models import convert_acmix_swin

if __name__ == '__main__':
    convert_cli(convert_acmix_swin, __doc__.splitlines()[0])
