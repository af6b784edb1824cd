"""Export an mmacmix backbone to ONNX with dynamic batch, height and width.

Usage: python tools/deploy/export_onnx.py CONFIG [CHECKPOINT] OUT, or
python tools/deploy/export_onnx.py --backbone-cfg CFG [CHECKPOINT] OUT.
CONFIG is an mmdet/mmseg config whose model.backbone is exported; CFG is the
backbone config itself (JSON, a dict(...) literal or a JSON file).
CHECKPOINT (a converted backbone, detector or segmentor checkpoint) is
loaded strictly; without it the config's init_cfg decides (a URL there is
downloaded; --cfg-options model.backbone.init_cfg=None exports random
weights). Checkpoints are read with torch.load(weights_only=True);
--trust-checkpoint reads any file you trust. X-volution is
exported in its deployed form. The graph is checked with onnxruntime against
PyTorch at two sizes before OUT is written; an existing OUT is kept unless
--force is given.
"""

import argparse
import warnings

from mmengine.config import DictAction

from mmacmix.cli import add_debug_flag, add_trust_flag, exit_on_error
from mmacmix.deploy import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    build_backbone,
    export_onnx,
    load_backbone_cfg,
)
from mmacmix.fileio import check_destination


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=' '.join(__doc__.split('\n\n')[1].split())
    )
    parser.add_argument(
        'paths',
        nargs='+',
        metavar='CONFIG [CHECKPOINT] OUT',
        help='config (unless --backbone-cfg), checkpoint, output file',
    )
    parser.add_argument(
        '--backbone-cfg',
        help="backbone config: JSON, dict(type='mmacmix.ACmixResNet', ...) "
        'or a JSON file',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of CONFIG (or of --backbone-cfg, as '
        'model.backbone), e.g. model.backbone.init_cfg=None',
    )
    parser.add_argument(
        '--shape',
        nargs=2,
        type=int,
        metavar=('H', 'W'),
        help='size of the traced input (default: 256x256, or the smallest '
        'valid size rounded up to 32)',
    )
    parser.add_argument(
        '--verify-shape',
        nargs=2,
        type=int,
        action='append',
        metavar=('H', 'W'),
        help='size to compare with PyTorch at (repeatable; default: the '
        'traced size and one 61 x 17 pixels larger)',
    )
    parser.add_argument(
        '--no-verify',
        action='store_true',
        help='skip the comparison with PyTorch (e.g. without onnxruntime)',
    )
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET)
    parser.add_argument(
        '--atol',
        type=float,
        default=DEFAULT_ATOL,
        help='largest absolute difference from PyTorch accepted',
    )
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists'
    )
    add_trust_flag(parser)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    positional = 1 if args.backbone_cfg is None else 0
    if not positional + 1 <= len(args.paths) <= positional + 2:
        parser.error(
            'expected CONFIG [CHECKPOINT] OUT'
            if positional
            else 'expected [CHECKPOINT] OUT with --backbone-cfg'
        )
    args.config = args.paths[0] if positional else None
    rest = args.paths[positional:]
    args.checkpoint = rest[0] if len(rest) == 2 else None
    args.out = rest[-1]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with exit_on_error(args.debug):
        check_destination(args.out, args.force, 'ONNX file')
        cfg = load_backbone_cfg(
            args.config, args.backbone_cfg, args.cfg_options
        )
        model = build_backbone(cfg, args.checkpoint, args.trust_checkpoint)
        if args.checkpoint is None and cfg.get('init_cfg') is None:
            warnings.warn(
                'no checkpoint and no init_cfg: exporting randomly '
                'initialised weights',
                stacklevel=1,
            )
        with warnings.catch_warnings():
            # The tracer warns about every size it records; the check
            # against PyTorch at two sizes is what tells a good graph.
            warnings.simplefilter('ignore')
            diffs = export_onnx(
                model,
                args.out,
                sample_size=args.shape,
                verify_sizes=[] if args.no_verify else args.verify_shape,
                opset=args.opset,
                atol=args.atol,
                force=args.force,
            )
    checked = ', '.join(
        f'{h}x{w}: {diff:.1e}' for (h, w), diff in diffs.items()
    )
    print(
        f'wrote {args.out} ({type(model).__name__}); largest difference '
        f'from PyTorch {checked or "not checked"}'
    )


if __name__ == '__main__':
    main()
