"""Convert a torchvision or OpenMMLab ResNet for ``mmacmix.XVolutionResNet``.

Usage: python tools/model_converters/resnet2xvolution.py SRC DST [--depth D]
[--force]. SRC is a torchvision state dict or an mmpretrain/mmcls/mmdet
checkpoint; --depth (18, 34, 50 or 101) is checked against the checkpoint
and read from it when omitted. X-volution goes into stage 3, as in the
configs under configs/xvolution_resnet/.
"""

import argparse
import functools
import sys

from mmacmix.checkpoint import convert_cli
from mmacmix.models import XVolutionResNet, convert_resnet_to_xvolution


def main(argv: list[str] | None = None) -> None:
    # convert_cli owns SRC DST --force; --depth is taken off first.
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        '--depth', type=int, choices=sorted(XVolutionResNet.arch_settings)
    )
    args, rest = parser.parse_known_args(
        sys.argv[1:] if argv is None else argv
    )
    convert = functools.partial(convert_resnet_to_xvolution, depth=args.depth)
    convert_cli(convert, ' '.join(__doc__.split('\n\n')[1].split()), rest)


if __name__ == '__main__':
    main()
