"""Parameters and FLOPs of a model, a config's backbone or a backbone type.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--backbone-only]
    python tools/analysis/get_flops.py --backbone mmacmix.ACmixResNet \
        depth=26 [--shape H W]

One fused multiply-add is one FLOP. By default the operators that actually
run are counted; --official-form counts the ACmix convolution path as the
paper and the official code compute it (see mmacmix.analysis.flops).
Operators still without a FLOP handle are listed, never silently dropped.
"""

import argparse
import contextlib
import sys

from mmengine.config import DictAction

from mmacmix.analysis import (
    analyse,
    build_backbone,
    build_from_config,
    official_form,
)
from mmacmix.cli import add_debug_flag, exit_on_error, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', nargs='?', help='mmdet or mmseg config')
    parser.add_argument(
        '--backbone',
        nargs='+',
        metavar=('TYPE', 'KEY=VALUE'),
        help='a registered backbone type and its arguments instead of a '
        'config, e.g. mmacmix.ACmixResNet depth=26',
    )
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help="count only the config's backbone",
    )
    parser.add_argument(
        '--shape',
        type=positive_int,
        nargs=2,
        default=[224, 224],
        metavar=('H', 'W'),
        help='input size (default: 224 224)',
    )
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument(
        '--by-operator', action='store_true', help='also list FLOPs per op'
    )
    parser.add_argument(
        '--official-form',
        action='store_true',
        help='count the ACmix convolution path as the paper does (fc and '
        'shift convolution) instead of the fused dense convolution that runs',
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if (args.config is None) == (args.backbone is None):
        parser.error('give either CONFIG or --backbone TYPE [KEY=VALUE ...]')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with exit_on_error(args.debug):
        if args.backbone:
            type_name, *pairs = args.backbone
            options = {}
            for pair in pairs:
                key, _, value = pair.partition('=')
                options[key] = DictAction._parse_iterable(value)
            model, inputs = build_backbone(type_name, options, args.shape)
            what = f'{type_name}({", ".join(pairs)})'
        else:
            model, inputs = build_from_config(
                args.config, args.backbone_only, args.shape, args.cfg_options
            )
            what = args.config + (' (backbone)' if args.backbone_only else '')
        counting = (
            official_form() if args.official_form else contextlib.nullcontext()
        )
        with counting:
            result = analyse(model, inputs)
    height, width = args.shape
    print(f'model:  {what}')
    print(f'input:  1 x 3 x {height} x {width}')
    print(f'params: {result["params"] / 1e6:.2f} M')
    form = 'official form' if args.official_form else 'as run'
    print(f'FLOPs:  {result["flops"] / 1e9:.2f} G (multiply-adds, {form})')
    if args.by_operator:
        for name, count in result['by_operator'].most_common():
            print(f'  {name:40s} {count / 1e9:8.3f} G')
    if result['uncounted']:
        listed = ', '.join(
            f'{name} (x{count})' for name, count in result['uncounted'].items()
        )
        print(f'not counted (no FLOP handle): {listed}', file=sys.stderr)
    return result


if __name__ == '__main__':
    main()
