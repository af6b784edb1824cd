"""Run a trained mmdet or mmseg model on image files or folders of images.

    python tools/infer.py CONFIG CHECKPOINT INPUT [INPUT ...] --out-dir DIR
        [--device DEVICE] [--score-thr T] [--cfg-options KEY=VALUE ...]
        [--trust-checkpoint] [--debug]

The config's default_scope (mmdet or mmseg) decides which inferencer runs.
DIR receives vis/ (the images with the predictions drawn) and preds/ (one
JSON file of boxes, scores, labels and masks per image for detection, one
PNG of class indices for segmentation). CHECKPOINT must fit the config's
model exactly and is read with torch.load(weights_only=True)
(--trust-checkpoint reads a file you trust that holds more); everything is
checked before anything is written.
"""

import argparse

from mmacmix.apis.inference import infer
from mmacmix.apis.runner import DictAction
from mmacmix.cli import (
    ArgumentParser,
    add_debug_flag,
    add_trust_flag,
    exit_on_error,
)


def probability(text: str) -> float:
    """An ``argparse`` type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f'expected a number in [0, 1], got {text!r}'
        )
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint that fits the config')
    parser.add_argument(
        'inputs', nargs='+', metavar='INPUT', help='image file or folder'
    )
    parser.add_argument(
        '--out-dir', required=True, help='where vis/ and preds/ go'
    )
    parser.add_argument(
        '--device', help="'cpu', 'cuda' or 'cuda:N' (default: CUDA if any)"
    )
    parser.add_argument(
        '--score-thr',
        type=probability,
        help='detection: the least score drawn in vis/ (default: 0.3); '
        'preds/ keeps every prediction, as mmdet does',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. model.backbone.deploy=True',
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_error(args.debug):
        result = infer(
            args.config,
            args.checkpoint,
            args.inputs,
            args.out_dir,
            device=args.device,
            score_thr=args.score_thr,
            cfg_options=args.cfg_options,
            trust=args.trust_checkpoint,
        )
    count = len(result.images)
    print(
        f'{result.task} of {count} image{"" if count == 1 else "s"}: '
        f'predictions in {args.out_dir}/preds, pictures in '
        f'{args.out_dir}/vis'
    )


if __name__ == '__main__':
    main()
