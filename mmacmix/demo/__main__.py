"""Train and evaluate ACmix Mask R-CNN on generated shapes, on the CPU.

    python -m mmacmix.demo [--out-dir work_dirs/demo] [--data-root
        data/shapes] [--iters N] [--tiny] [--data-only] [--debug]

Generates the dataset if it is absent, trains, evaluates (COCO bbox and
mask mAP) and writes metrics.json, loss_curve.png and predictions/*.png.
"""

import argparse

from mmacmix.cli import add_debug_flag, exit_on_error, positive_int
from mmacmix.datasets import generate_shapes_dataset
from mmacmix.fileio import check_folder

from .pipeline import DEMO_SHAPES, run_demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog='python -m mmacmix.demo', description=__doc__.split('\n')[0]
    )
    parser.add_argument('--out-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument('--config', help='Mask R-CNN config to train')
    parser.add_argument(
        '--iters', type=positive_int, help='training iterations (N >= 1)'
    )
    parser.add_argument(
        '--tiny', action='store_true', help='seconds-long smoke run'
    )
    parser.add_argument(
        '--data-only',
        action='store_true',
        help='only generate the dataset (e.g. for the UperNet config)',
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with exit_on_error(args.debug):
        if args.data_only:
            check_folder(args.data_root, 'data folder')
            generate_shapes_dataset(args.data_root, DEMO_SHAPES)
            print(f'shapes dataset in {args.data_root}')
            return
        run_demo(
            out_dir=args.out_dir,
            data_root=args.data_root,
            config=args.config,
            tiny=args.tiny,
            max_iters=args.iters,
        )


if __name__ == '__main__':
    main()
