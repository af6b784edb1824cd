"""Evaluate a checkpoint of an mmdet or mmseg model on its test split.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
        [--metrics-out FILE.json] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm}]

The metrics are logged and printed as one JSON line at the end.
"""

import argparse
import json

from mmengine.dist import get_rank

from mmacmix.apis import test
from mmacmix.apis.dist import LAUNCHERS
from mmacmix.apis.runner import DictAction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = test(
        args.config,
        args.checkpoint,
        work_dir=args.work_dir,
        cfg_options=args.cfg_options,
        launcher=args.launcher,
        metrics_out=args.metrics_out,
    )
    if get_rank() == 0:
        print('metrics: ' + json.dumps(metrics, sort_keys=True))


if __name__ == '__main__':
    main()
