"""Parameters and FLOPs of a model, a config's backbone or a backbone type.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--backbone-only]
    python tools/analysis/get_flops.py --backbone mmacmix.ACmixResNet \
        depth=26 [--shape H W]

Counts come from MMEngine's FlopAnalyzer (jit tracing). Convention: one
fused multiply-add is one FLOP (MMEngine, fvcore and the ACmix paper's
tables alike). The ACmix local attention runs in a custom autograd function
that tracing cannot see into; it is counted by the handle below as
2 * B * C * Ho * Wo * k^2 (logits q.k and the weighted sum of v over the
k x k window); PyTorch's fused scaled_dot_product_attention (ACmix-Swin's
window attention) as q @ k^T plus weights @ v. Softmax, like every
elementwise op, is not counted.

mmacmix computes the ACmix convolution path as one dense 3x3 convolution of
the block input (the projections, fc and shift kernels folded together:
the same function, faster on a CPU, but more multiply-adds). By default the
operators that actually run are counted; --official-form counts the path
as the paper and the official code compute it (fc over the shared q/k/v
maps, then the grouped shift convolution; at stride 2 the queries of every
position, where mmacmix projects only the window centres), which is what
the paper's FLOPs columns mean.
Operators still without a handle are listed, never silently dropped.
"""

import argparse
import contextlib
import sys
from collections.abc import Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.config import DictAction
from torch import nn

# Custom autograd functions as they appear in a traced graph.
LOCAL_ATTENTION_OPS = (
    'prim::PythonOp._LocalAttentionNative',
    'prim::PythonOp._LocalAttentionLoop',
)
# Operators that cost nothing worth counting (shape bookkeeping, copies).
FREE_OPS = (
    'aten::index_select',
    'aten::fill_',
    'aten::new_zeros',
    'aten::zeros_like',
)


def local_attention_handle(kernel_size: int):
    """FLOP handle of ``local_attention(q, k, v, kernel_size, stride)``.

    ``q`` and the output are ``(N, D, Ho, Wo)``; each output pixel takes
    ``k^2`` dot products of length ``D`` and a ``k^2``-term weighted sum of
    ``D``-vectors: ``2 * N * D * Ho * Wo * k^2`` multiply-adds. The traced
    node carries only q, k and v, so the window size comes from the model.
    """

    def count(inputs: list, outputs: list) -> int:
        n, d, ho, wo = get_shape(outputs[0])
        return 2 * n * d * ho * wo * kernel_size**2

    return count


def sdpa_flops(inputs: list, outputs: list) -> int:
    """FLOPs of ``scaled_dot_product_attention(q, k, v)``: ``q @ k^T`` and
    the product of the weights with ``v``, ``(..., L, S)`` each."""
    query, key, value = (get_shape(x) for x in inputs[:3])
    *batch, length, channels = query
    sources = key[-2]
    count = length * sources * (channels + value[-1])
    for size in batch:
        count *= size
    return count


def attention_kernel_size(model: nn.Module) -> int | None:
    """The one local-attention window size used in ``model`` (or None).

    Raises:
        ValueError: If modules use different sizes (the traced graph
            cannot tell their calls apart).
    """
    sizes = {
        module.attn_kernel_size
        for module in model.modules()
        if isinstance(getattr(module, 'attn_kernel_size', None), int)
    }
    if len(sizes) > 1:
        raise ValueError(
            f'local attention with several window sizes {sorted(sizes)}: '
            'their FLOPs cannot be told apart in the traced graph'
        )
    return sizes.pop() if sizes else None


def baddbmm_flops(inputs: list, outputs: list) -> int:
    """FLOPs of ``baddbmm(input, batch1, batch2)``: ``(B, M, K) @ (B, K,
    N)``, the form of ACmix's 1x1 projections; the bias add is free."""
    batch, rows, inner = get_shape(inputs[1])
    return batch * rows * inner * get_shape(inputs[2])[-1]


def _free(inputs: list, outputs: list) -> int:
    return 0


class _SharedProjection(torch.autograd.Function):
    """The q/k/v projection, recomputed for the official-form count.

    The block has computed and counted it already; the official convolution
    path reuses it, so this second computation is traced as its own
    operator and counted as free.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        return F.conv2d(x, weight[:, :, None, None], bias)


def _official_conv_path(self, x, proj_weight, proj_bias, scale=None):
    """``ACmixBase.fused_conv_path`` computed the official way."""
    qkv = _SharedProjection.apply(x, proj_weight, proj_bias)
    out = self.conv_path(qkv)
    return out if scale is None else out * scale


def _official_queries(self, x, scale):
    """``ACmix.project_queries`` computed the official way: every position
    is projected, then the window centres are kept."""
    q = F.conv2d(x, self.conv1.weight * scale, self.conv1.bias * scale)
    return q[..., :: self.stride, :: self.stride]


@contextlib.contextmanager
def official_form():
    """Makes every ACmix op compute its convolution path (factorised) and
    its queries (all positions projected) in the official form, with the
    same results, while the model is traced."""
    from mmacmix.models.acmix import ACmix, ACmixBase

    with (
        mock.patch.object(ACmixBase, 'fused_conv_path', _official_conv_path),
        mock.patch.object(ACmix, 'project_queries', _official_queries),
    ):
        yield


def analyse(model: nn.Module, inputs: tuple) -> dict:
    """Counts parameters and FLOPs of ``model(*inputs)``.

    Returns:
        dict: ``params``, ``flops``, ``by_operator`` (a Counter) and
        ``uncounted`` (operators met but not counted, with how often).
    """
    model.eval()
    analyzer = FlopAnalyzer(model, inputs)
    kernel_size = attention_kernel_size(model)
    if kernel_size is not None:
        for name in LOCAL_ATTENTION_OPS:
            analyzer.set_op_handle(name, local_attention_handle(kernel_size))
    # MMEngine 0.10.7 has no handle for PyTorch's fused attention.
    analyzer.set_op_handle('aten::scaled_dot_product_attention', sdpa_flops)
    analyzer.set_op_handle('aten::baddbmm', baddbmm_flops)
    for name in (*FREE_OPS, 'prim::PythonOp._SharedProjection'):
        analyzer.set_op_handle(name, _free)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    with torch.no_grad():
        flops = analyzer.total()
    return dict(
        params=parameter_count(model)[''],
        flops=flops,
        by_operator=analyzer.by_operator(),
        uncounted=analyzer.unsupported_ops(),
    )


def build_from_config(
    config: str, backbone_only: bool, shape: Sequence[int], cfg_options=None
) -> tuple[nn.Module, tuple]:
    """Builds the model (or its backbone) of a config and dummy inputs."""
    from mmacmix.apis import load_config
    from mmacmix.apis.dist import replace_sync_bn

    cfg = load_config(config, cfg_options=cfg_options)
    replace_sync_bn(cfg.model)  # no process group here
    scope = cfg.default_scope
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    from mmengine.registry import init_default_scope

    init_default_scope(scope)
    image = torch.randn(1, 3, *shape)
    if backbone_only:
        return registry.build(cfg.model.backbone), (image,)
    cfg.model.pop('pretrained', None)
    model = registry.build(cfg.model)
    return TensorModeWrapper(model, scope, shape), (image,)


class TensorModeWrapper(nn.Module):
    """Runs an mmdet/mmseg model in ``mode='tensor'`` on a bare image, so
    that it can be traced (data samples carry only the image size)."""

    def __init__(self, model: nn.Module, scope: str, shape) -> None:
        super().__init__()
        self.model = model
        meta = dict(
            img_shape=tuple(shape),
            ori_shape=tuple(shape),
            pad_shape=tuple(shape),
            batch_input_shape=tuple(shape),
            scale_factor=(1.0, 1.0),
        )
        if scope == 'mmdet':
            from mmdet.structures import DetDataSample as Sample
        else:
            from mmseg.structures import SegDataSample as Sample
        self.samples = [Sample(metainfo=meta)]

    def forward(self, image: torch.Tensor):
        return self.model(image, self.samples, mode='tensor')


def build_backbone(type_name: str, options: dict, shape) -> tuple:
    """Builds a registered backbone from its type and arguments."""
    from mmengine.registry import MODELS

    import mmacmix.models  # noqa: F401  (registers mmacmix.*)

    model = MODELS.build(dict(type=type_name, **options))
    return model, (torch.randn(1, 3, *shape),)


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
        type=int,
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
    args = parser.parse_args(argv)
    if (args.config is None) == (args.backbone is None):
        parser.error('give either CONFIG or --backbone TYPE [KEY=VALUE ...]')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
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
