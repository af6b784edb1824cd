"""Train and evaluate ACmix Mask R-CNN on generated shapes, on the CPU.

    python -m mmacmix.demo [--out-dir work_dirs/demo] [--data-root
        data/shapes] [--config CONFIG] [--iters N] [--tiny] [--data-only]
        [--debug] [--pretrain [--pretrain-iters N]] [--compare] [--seed N]

Generates the dataset if it is absent, trains, evaluates (COCO bbox and
mask mAP) and writes metrics.json, loss_curve.png and predictions/*.png.
--config trains another mmdet config on the shapes, or an mmseg one, e.g.
configs/demo/acmix-r26_upernet_shapes.py (mIoU, and pictures of the
predicted classes). A failed run leaves OUT_DIR as it was.

--pretrain first pretrains ACmix-ResNet-26 with mmpretrain as a classifier
of the shapes (crops of the dataset, in DATA_ROOT/cls; top-1 reported),
then trains the detector from that checkpoint and, at the same iterations,
from scratch. --compare trains it with a plain ResNet-26 too (3x3
convolutions where ACmix-ResNet-26 has ACmix). Either flag writes each run
into OUT_DIR/<run>/ and the table of all into OUT_DIR/summary.md and
summary.json.
"""

from mmacmix.cli import (
    ArgumentParser,
    add_debug_flag,
    exit_on_error,
    non_negative_int,
    positive_int,
    start_command,
)
from mmacmix.datasets import generate_shape_crops, generate_shapes_dataset
from mmacmix.fileio import check_folder

from .comparison import run_comparison
from .pipeline import DEMO_SHAPES, run_demo


def main(argv: list[str] | None = None) -> None:
    start_command()
    parser = ArgumentParser(
        prog='python -m mmacmix.demo',
        description=__doc__.split('\n')[0],
    )
    parser.add_argument('--out-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/shapes')
    parser.add_argument(
        '--config',
        help='mmdet or mmseg config on the shapes to train (default: '
        "the demo's ACmix Mask R-CNN)",
    )
    parser.add_argument(
        '--iters',
        type=positive_int,
        help='training iterations of every detector (N >= 1)',
    )
    parser.add_argument(
        '--tiny', action='store_true', help='seconds-long smoke run'
    )
    parser.add_argument(
        '--data-only',
        action='store_true',
        help='only generate the dataset (e.g. for tools/train.py); '
        'with --pretrain, its classification crops too',
    )
    parser.add_argument(
        '--pretrain',
        action='store_true',
        help='pretrain ACmix-ResNet-26 on crops of the shapes, then train '
        'the detector from it and from scratch at equal iterations',
    )
    parser.add_argument(
        '--pretrain-iters',
        type=positive_int,
        help='pretraining iterations (N >= 1; with --pretrain)',
    )
    parser.add_argument(
        '--compare',
        action='store_true',
        help='also train the detector with a plain ResNet-26 backbone',
    )
    parser.add_argument(
        '--seed',
        type=non_negative_int,
        help="random seed of every training (N >= 0; default: the configs' "
        '0); another seed shows how much the results vary',
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    several = args.pretrain or args.compare
    if args.config and several:
        parser.error(
            '--config cannot be combined with --pretrain or --compare, '
            "which train the demo's own configs"
        )
    if args.pretrain_iters is not None and not args.pretrain:
        parser.error('--pretrain-iters needs --pretrain')
    if args.data_only and args.compare:
        parser.error('--data-only trains nothing to --compare')
    with exit_on_error(args.debug):
        if args.data_only:
            check_folder(args.data_root, 'data folder')
            generate_shapes_dataset(args.data_root, DEMO_SHAPES)
            print(f'shapes dataset in {args.data_root}')
            if args.pretrain:
                print(f'shape crops in {generate_shape_crops(args.data_root)}')
            return
        if several:
            run_comparison(
                out_dir=args.out_dir,
                data_root=args.data_root,
                pretrain=args.pretrain,
                compare=args.compare,
                tiny=args.tiny,
                max_iters=args.iters,
                pretrain_iters=args.pretrain_iters,
                seed=args.seed,
            )
            return
        run_demo(
            out_dir=args.out_dir,
            data_root=args.data_root,
            config=args.config,
            tiny=args.tiny,
            max_iters=args.iters,
            seed=args.seed,
        )


if __name__ == '__main__':
    main()
