"""Evaluate a checkpoint of an mmdet or mmseg model on its test split.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
        [--metrics-out FILE.json] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm}] [--non-strict]
        [--trust-checkpoint] [--debug]

The metrics are logged and printed as one JSON line at the end. CHECKPOINT
must fit the config's model exactly (mmdet's test script loads whatever
fits); --non-strict loads it anyway, logging the keys that do not fit.
CHECKPOINT is read with torch.load(weights_only=True), and a file that needs
more than weights is refused; --trust-checkpoint reads any file you trust.
"""

import argparse
import json

from mmengine.dist import get_rank

from mmacmix.apis import test
from mmacmix.apis.dist import LAUNCHERS
from mmacmix.apis.runner import DictAction
from mmacmix.cli import (
    ArgumentParser,
    add_debug_flag,
    add_trust_flag,
    exit_on_error,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint to evaluate')
    parser.add_argument('--work-dir', help='where logs go')
    parser.add_argument(
        '--metrics-out', help='also write the metrics to this JSON file'
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. test_dataloader.batch_size=4',
    )
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none')
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    parser.add_argument(
        '--non-strict',
        action='store_true',
        help='evaluate CHECKPOINT even if its keys do not fit the model '
        '(those that do not are logged as a warning)',
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_error(args.debug):
        metrics = test(
            args.config,
            args.checkpoint,
            work_dir=args.work_dir,
            cfg_options=args.cfg_options,
            launcher=args.launcher,
            metrics_out=args.metrics_out,
            strict=not args.non_strict,
            trust=args.trust_checkpoint,
        )
    if get_rank() == 0:
        print('metrics: ' + json.dumps(metrics, sort_keys=True))


if __name__ == '__main__':
    main()
