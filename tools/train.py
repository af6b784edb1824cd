"""Train an mmdet or mmseg model (OpenMMLab's train.py command line).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm}]
        [--non-strict] [--trust-checkpoint] [--debug]

The config's default_scope (mmdet or mmseg) decides which codebase is used.
For several processes use tools/dist_train.sh or tools/slurm_train.sh.
Checkpoints (--resume, load_from, Pretrained weights) must fit the model
exactly (--non-strict loads what fits) and are read with
torch.load(weights_only=True) (--trust-checkpoint reads any file you trust).
"""

import argparse

from mmengine.runner import Runner

from mmacmix.apis import train
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
    parser.add_argument(
        '--work-dir',
        help='where logs and checkpoints go (default: '
        "the config's work_dir, else work_dirs/CONFIG_NAME)",
    )
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from CKPT, or, without a value, from the latest '
        'checkpoint of the work folder',
    )
    parser.add_argument(
        '--amp', action='store_true', help='mixed precision (needs a GPU)'
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. train_cfg.max_iters=100',
    )
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none')
    # torch.distributed.launch passes --local-rank; torchrun sets env vars.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    parser.add_argument(
        '--non-strict',
        action='store_true',
        help='resume or start from load_from even if the checkpoint does '
        'not fit the model exactly (the keys that do not are logged as a '
        'warning)',
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Runner:
    args = parse_args(argv)
    with exit_on_error(args.debug):
        return train(
            args.config,
            work_dir=args.work_dir,
            resume=args.resume or False,
            amp=args.amp,
            cfg_options=args.cfg_options,
            launcher=args.launcher,
            strict=not args.non_strict,
            trust=args.trust_checkpoint,
        )


if __name__ == '__main__':
    main()
