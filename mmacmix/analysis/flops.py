"""Counting parameters and FLOPs, as run or in the official form.

Counts come from MMEngine's FlopAnalyzer (jit tracing). Convention: one
fused multiply-add is one FLOP (MMEngine, fvcore and the ACmix paper's
tables alike). The ACmix local attention is one registered operator,
opaque to tracing; it is counted by :func:`local_attention_handle` as
2 * B * C * Ho * Wo * k^2 (logits q.k and the weighted sum of v over the
k x k window); PyTorch's fused
scaled_dot_product_attention (ACmix-Swin's window attention, X-volution's
global attention) as q @ k^T plus weights @ v. Softmax, like every
elementwise op, is not counted.

mmacmix computes the ACmix convolution path as one dense 3x3 convolution of
the block input (the projections, fc and shift kernels folded together:
the same function, faster on a CPU, but more multiply-adds).
:func:`official_form` makes a traced model count the path as the paper and
the official code compute it (fc over the shared q/k/v maps, then the
grouped shift convolution; at stride 2 the queries of every position, where
mmacmix projects only the window centres), which is what the paper's FLOPs
columns mean. Operators still without a handle are reported by
:func:`analyse`, never silently dropped.
"""

import contextlib
from collections.abc import Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.registry import MODELS
from torch import nn

import mmacmix.models  # noqa: F401  (registers mmacmix.*)
from mmacmix.apis import build_model, load_config
from mmacmix.models.acmix import ACmix, ACmixBase

# The registered local-attention op as it appears in a traced graph.
LOCAL_ATTENTION_OPS = ('mmacmix::local_attention',)
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


def patch_aggregation_flops(inputs: list, outputs: list) -> int:
    """FLOPs of SAN's ``patch_aggregation(values, weights, k)``
    (ACmix-SAN): one multiply-add per output element and window position,
    ``B * C * H * W * k^2``; ``weights`` is ``(B, G, k^2, H, W)``."""
    count = get_shape(inputs[1])[2]
    for size in get_shape(outputs[0]):
        count *= size
    return count


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
    analyzer.set_op_handle(
        'mmacmix::patch_aggregation', patch_aggregation_flops
    )
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
    cfg = load_config(config, cfg_options=cfg_options)
    image = torch.randn(1, 3, *shape)
    if backbone_only:
        return build_model(cfg, 'backbone'), (image,)
    cfg.model.pop('pretrained', None)
    model = build_model(cfg)
    return TensorModeWrapper(model, cfg.default_scope, shape), (image,)


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
    model = MODELS.build(dict(type=type_name, **options))
    return model, (torch.randn(1, 3, *shape),)
