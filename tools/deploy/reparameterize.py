"""Re-parameterise a trained X-volution model into its deployed form.

Usage: python tools/deploy/reparameterize.py CONFIG CHECKPOINT OUT [--force]
[--cfg-options KEY=VALUE ...] [--trust-checkpoint]. Builds the model of
CONFIG, loads CHECKPOINT (strictly; read with weights_only=True unless
--trust-checkpoint), turns every X-volution into its single-operator form
(branch norms folded, branches merged), checks that the backbone's outputs
did not change, and writes OUT atomically. It prints the ``--cfg-options``
under which CONFIG loads OUT (e.g. ``model.backbone.deploy=True``), after
checking that they do.
"""

import argparse

from mmengine.config import DictAction

from mmacmix.cli import add_debug_flag, add_trust_flag, exit_on_error
from mmacmix.deploy import reparameterize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=' '.join(__doc__.split('\n\n')[1].split())
    )
    parser.add_argument('config', help='config of the trained model')
    parser.add_argument('checkpoint', help='trained checkpoint to read')
    parser.add_argument('out', help='deployed checkpoint to write')
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists'
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of CONFIG, as for mmdet/mmseg tools',
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with exit_on_error(args.debug):
        options = reparameterize(
            args.config,
            args.checkpoint,
            args.out,
            args.cfg_options,
            args.force,
            trust=args.trust_checkpoint,
        )
    print(
        f'wrote {args.out}; load it with {args.config} --cfg-options '
        f'{" ".join(options)}'
    )


if __name__ == '__main__':
    main()
