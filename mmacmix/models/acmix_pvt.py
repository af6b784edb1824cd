"""ACmix-PVT: the Pyramid Vision Transformer (v1) with ACmix attention.

The ACmix paper reports ACmix PVT-T and PVT-S (13M / 2.0G and 25M / 3.9G at
224x224, against 13.2M / 1.9G and 24.5M / 3.8G for the plain models) but
its code was never released. Here PVT v1 (Wang et al., ICCV 2021) keeps
everything but its attention: every spatial-reduction attention (SRA)
becomes :class:`ACmixSRAttention`, whose q, k, v projections also feed the
ACmix convolution path of :class:`~mmacmix.models.acmix.ACmixBase`, added
after the output projection with the two learnable rates, as in the
official ACmix-Swin.

**Where the reduced keys and values meet the convolution path.** SRA
computes queries at full resolution ``H x W`` but keys and values from a
map reduced ``sr`` times, ``LN(Conv(kernel=stride=sr)(x))``; the
convolution path needs all ``3 * heads`` maps at one resolution. Here the
reduced keys and values are brought back to ``H x W`` by nearest-neighbour
upsampling: every position takes the key and value of the ``sr x sr`` cell
it was reduced into, and the convolution path runs on ``[q, up(k), up(v)]``
at full resolution. Reasons:

* the projections stay shared: the convolution path sees exactly the
  queries, keys and values the attention uses, and no parameter is added
  besides ACmix's own (``fc``, ``dep_conv``, ``rate1``, ``rate2``);
* it costs nothing beyond the convolution path itself, which keeps the
  published budgets (counted as the paper does: 2.02G and 3.98G for T and
  S, see docs/en/model_zoo.md). Projecting k and v a second time from the
  full-resolution map would add ``2 * C^2`` multiply-adds per position in
  stages 1-3, +0.18 GFLOPs for PVT-T, 9% more than the published 2.0G;
* the output keeps its full resolution: running the convolution path on
  the reduced map instead would give it the same coarse view as the
  attention, where the point of the convolution is local detail. The
  queries carry that detail; the upsampled keys and values add the cell's
  summary, constant inside a cell and changing across cell borders.

Stage 4 (``sr = 1``) is the plain case of full-resolution q, k and v.

**Names.** The plain parts keep the parameter names of mmdet's
``PyramidVisionTransformer`` (``layers.I.0`` patch embedding,
``layers.I.1.0.pos_embed``, ``layers.I.1.J`` blocks with
``attn.attn.in_proj_weight`` and ``ffn.layers.0/3`` 1x1 convolutions), so
an mmdet PVT state dict loads into the plain part as it is; the ACmix
keys are ``layers.I.1.J.attn.{fc, dep_conv, rate1, rate2}``.
:func:`mmacmix.models.converters.convert_pvt_to_acmix` fills the plain part
from a plain PVT ImageNet checkpoint and starts the convolution path
switched off.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule, ModuleList
from torch import Tensor, nn

from mmacmix.registry import MODELS

from .acmix import ACmixBase
from .utils import (
    FrozenStagesMixin,
    PatchEmbed,
    arch_settings,
    check_image_batch,
    freeze,
    init_weights_strictly,
    stage_arguments,
)

# PVT's layer norms, in the original and in mmdet.
LN_EPS = 1e-6
# Attentions with at most this many heads compute the convolution path as
# one dense convolution (ACmixBase.fused_conv_path), wider ones factorised
# (ACmixBase.conv_path); the results are equal. The shift convolution has
# ``num_heads`` outputs per group, and with few of them its grouped form is
# the slower one (docs/en/benchmarks.md: ``--tables pvt-conv-path``).
FUSED_MAX_HEADS = 2


def tokens_to_map(x: Tensor, hw_shape: tuple[int, int]) -> Tensor:
    """``(B, H * W, C)`` tokens as a ``(B, C, H, W)`` map."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, *hw_shape)


class PositionEmbedding(BaseModule):
    """PVT's absolute position embedding, resized to the map.

    Args:
        grid (int): Side of the learned grid (the map side at the
            pretraining size).
        embed_dims (int): Channels.
        drop_rate (float): Dropout after adding it.
    """

    def __init__(self, grid: int, embed_dims: int, drop_rate: float) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dims))
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: Tensor, hw_shape: tuple[int, int]) -> Tensor:
        """Adds the embedding, bilinearly resized to ``hw_shape``, as mmdet
        does (at the pretraining size the resize is the identity)."""
        grid = tokens_to_map(self.pos_embed, (self.grid, self.grid))
        grid = F.interpolate(grid, size=hw_shape, mode='bilinear')
        return self.drop(x + grid.flatten(2).transpose(1, 2))


class PackedProjections(nn.Module):
    """The q/k/v in-projection and the output projection of an attention.

    Named as in ``nn.MultiheadAttention``, as mmdet's PVT stores them:
    ``in_proj_weight`` holds the q, k and v rows in this order.
    """

    def __init__(self, embed_dims: int, bias: bool) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(
            torch.empty(3 * embed_dims, embed_dims)
        )
        self.in_proj_bias = (
            nn.Parameter(torch.zeros(3 * embed_dims)) if bias else None
        )
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        nn.init.trunc_normal_(self.in_proj_weight, std=0.02)


class ACmixSRAttention(ACmixBase):
    """PVT's spatial-reduction attention with the ACmix convolution path.

    ``rate1 * out_proj(attention) + rate2 * convolution``, where the
    attention is PVT's (queries from every position, keys and values from
    the map reduced ``sr_ratio`` times) and the convolution path runs on
    the queries and the nearest-upsampled keys and values (see the module
    docstring for why). Maps whose sides are no multiple of ``sr_ratio``
    are zero-padded at the bottom and right before the reduction.

    With at most ``FUSED_MAX_HEADS`` heads, the convolution path is computed
    as :meth:`~ACmixBase.fused_conv_path` of ``[x, up(LN(sr(x)))]`` with the
    block-diagonal projection, the same function as
    :meth:`~ACmixBase.conv_path` of ``[q, up(k), up(v)]``.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        sr_ratio (int): Spatial reduction of the keys and values.
        qkv_bias (bool): Bias of the q, k, v projections. Defaults to True.
        attn_drop_rate (float): Dropout of the attention weights. Defaults
            to 0.
        proj_drop_rate (float): Dropout of the mixed output. Defaults to 0.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        sr_ratio: int,
        qkv_bias: bool = True,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
    ) -> None:
        super().__init__(embed_dims, num_heads, fc_bias=True)
        self.sr_ratio = sr_ratio
        self.fused = num_heads <= FUSED_MAX_HEADS
        self.attn_drop_rate = attn_drop_rate
        self.attn = PackedProjections(embed_dims, qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(
                embed_dims, embed_dims, sr_ratio, stride=sr_ratio
            )
            self.norm = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def forward(self, x: Tensor, hw_shape: tuple[int, int]) -> Tensor:
        """Applies the attention to ``(B, H * W, C)`` normalised tokens.

        Returns:
            Tensor: ``(B, H * W, C)``.
        """
        # The widths as Python numbers: traced for ONNX, the sizes of the
        # weights' slices and padding would otherwise become graph values.
        (b, n, _), c = x.shape, self.embed_dims
        heads, dims, sr = self.num_heads, self.head_dims, self.sr_ratio
        weight, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        q_bias = kv_bias = None
        if bias is not None:
            q_bias, kv_bias = bias[:c], bias[c:]
        q = F.linear(x, weight[:c], q_bias)
        x_map = tokens_to_map(x, hw_shape)
        source, source_shape = x, hw_shape
        if sr > 1:
            h, w = hw_shape
            reduced = self.sr(F.pad(x_map, (0, -w % sr, 0, -h % sr)))
            source_shape = (reduced.shape[2], reduced.shape[3])
            source = self.norm(reduced.flatten(2).transpose(1, 2))
        kv = F.linear(source, weight[c:], kv_bias)  # (B, N', 2C)

        attention = F.scaled_dot_product_attention(
            q.view(b, n, heads, dims).transpose(1, 2),
            *kv.view(b, -1, 2, heads, dims).permute(2, 0, 3, 1, 4),
            dropout_p=self.attn_drop_rate if self.training else 0.0,
        )
        attention = self.attn.out_proj(attention.transpose(1, 2).flatten(2))

        if not self.fused:
            qkv = torch.cat(
                [
                    tokens_to_map(q, hw_shape),
                    self.upsample(kv, source_shape, hw_shape),
                ],
                dim=1,
            )
            convolution = self.conv_path(qkv)
        elif sr > 1:
            # q, up(k), up(v) are the block-diagonal projection of x and
            # up(source): upsampling commutes with a 1x1 projection.
            inputs = torch.cat(
                [x_map, self.upsample(source, source_shape, hw_shape)], dim=1
            )
            projection = torch.cat(
                [
                    torch.cat([weight[:c], weight.new_zeros(c, c)], dim=1),
                    torch.cat([weight.new_zeros(2 * c, c), weight[c:]], dim=1),
                ]
            )
            convolution = self.fused_conv_path(inputs, projection, bias)
        else:
            convolution = self.fused_conv_path(x_map, weight, bias)
        convolution = convolution.flatten(2).transpose(1, 2)
        return self.proj_drop(self.mix(attention, convolution))

    def upsample(
        self,
        tokens: Tensor,
        shape: tuple[int, int],
        hw_shape: tuple[int, int],
    ) -> Tensor:
        """Maps reduced ``(B, h * w, C')`` tokens to a ``(B, C', H, W)``
        map: each position takes the value of its ``sr x sr`` cell."""
        reduced = tokens_to_map(tokens, shape)
        if self.sr_ratio == 1:
            return reduced
        full = F.interpolate(reduced, scale_factor=self.sr_ratio)
        return full[..., : hw_shape[0], : hw_shape[1]]

    def extra_repr(self) -> str:
        return (
            f'{self.embed_dims}, num_heads={self.num_heads}, '
            f'sr_ratio={self.sr_ratio}'
        )


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution applied to ``(B, N, C)`` tokens as a linear layer.

    mmdet stores PVT's MLP as 1x1 convolutions: the module keeps their
    parameter shapes, the tokens need no reshaping to maps.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class FFN(BaseModule):
    """PVT's MLP: 1x1 conv, GELU, dropout, 1x1 conv, dropout, on tokens."""

    def __init__(
        self, embed_dims: int, hidden_dims: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            PointwiseConv(embed_dims, hidden_dims),
            nn.GELU(),
            nn.Dropout(drop_rate),
            PointwiseConv(hidden_dims, embed_dims),
            nn.Dropout(drop_rate),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ACmixPVTBlock(BaseModule):
    """A PVT encoder layer whose attention is :class:`ACmixSRAttention`.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        sr_ratio (int): Spatial reduction of the keys and values.
        mlp_ratio (float): Hidden / input channels of the MLP.
        qkv_bias (bool): Bias of the q, k, v projections.
        drop_rate (float): Dropout after the attention and in the MLP.
        attn_drop_rate (float): Dropout of the attention weights.
        drop_path_rate (float): Stochastic depth of both residual branches.
        with_cp (bool): Recompute the block in backward to save memory.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self.attn = ACmixSRAttention(
            embed_dims,
            num_heads,
            sr_ratio,
            qkv_bias=qkv_bias,
            attn_drop_rate=attn_drop_rate,
            proj_drop_rate=drop_rate,
        )
        self.norm2 = nn.LayerNorm(embed_dims, eps=LN_EPS)
        self.ffn = FFN(embed_dims, int(embed_dims * mlp_ratio), drop_rate)
        self.drop_path = (
            DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        )

    def forward(self, x: Tensor, hw_shape: tuple[int, int]) -> Tensor:
        """Applies the block to ``(B, H * W, C)`` tokens."""

        def inner(x: Tensor) -> Tensor:
            x = x + self.drop_path(self.attn(self.norm1(x), hw_shape))
            return x + self.drop_path(self.ffn(self.norm2(x)))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


class ACmixPVTStage(ModuleList):
    """Patch embedding, position embedding, blocks and an optional norm.

    Held as ``[patch_embed, [position, *blocks], norm]``: the nesting of
    mmdet's PVT, which gives the parameters their names
    (``layers.I.0.projection``, ``layers.I.1.0.pos_embed``,
    ``layers.I.1.J.attn``..., ``layers.I.2`` for mmdet's stage norms).
    """

    def __init__(
        self,
        patch_embed: PatchEmbed,
        position: PositionEmbedding,
        blocks: Sequence[ACmixPVTBlock],
        norm: nn.LayerNorm | None = None,
    ) -> None:
        norms = [] if norm is None else [norm]
        super().__init__(
            [patch_embed, ModuleList([position, *blocks]), *norms]
        )

    def forward(self, x: Tensor) -> Tensor:
        """Maps a ``(B, C_in, H, W)`` map to the stage's ``(B, C, H', W')``
        output, ``H' = ceil(H / patch_size)``."""
        patch_embed, (position, *blocks), *norms = self
        x, hw_shape = patch_embed(x)
        x = position(x, hw_shape)
        for block in blocks:
            x = block(x, hw_shape)
        for norm in norms:
            x = norm(x)
        return tokens_to_map(x, hw_shape).contiguous()


@MODELS.register_module()
class ACmixPVT(FrozenStagesMixin, BaseModule):
    """ACmix-PVT backbone with the API of mmdet's PVT.

    PVT v1 (four stages of patch embedding, absolute position embedding and
    spatial-reduction attention blocks) whose every attention is
    :class:`ACmixSRAttention` (see the module docstring for the design).
    Any input size: patch embeddings and spatial reductions zero-pad the
    bottom and right, so stage ``i`` has ``ceil(H / 2**(i + 2))`` rows, and
    the position embeddings are resized bilinearly to every map, as in
    mmdet. At sizes that are multiples of 32 no padding happens.

    Args:
        arch (str | dict): ``'tiny'`` / ``'t'``, ``'small'`` / ``'s'``, or a
            dict with ``embed_dims``, ``depths`` and ``num_heads`` (one
            entry per stage). Defaults to ``'tiny'``.
        in_channels (int): Image channels. Defaults to 3.
        pretrain_img_size (int): Image side the position embeddings were
            learned for; stage ``i`` learns a grid of side
            ``pretrain_img_size`` over its total stride. Defaults to 224.
        patch_sizes (Sequence[int]): Patch side of each stage's embedding.
            Defaults to (4, 2, 2, 2).
        sr_ratios (Sequence[int]): Spatial reduction of the keys and values
            in each stage. Defaults to (8, 4, 2, 1).
        mlp_ratios (Sequence[float]): Hidden / input channels of the MLPs of
            each stage. Defaults to (8, 8, 4, 4).
        qkv_bias (bool): Bias of the q, k, v projections. Defaults to True.
        drop_rate (float): Dropout after the position embeddings, the
            attentions and in the MLPs. Defaults to 0.
        attn_drop_rate (float): Dropout of the attention weights. Defaults
            to 0.
        drop_path_rate (float): Stochastic depth of the last block, rising
            linearly from 0 at the first. Defaults to 0.1 (as mmdet's PVT).
        out_indices (Sequence[int]): Stages whose outputs are returned.
            Defaults to (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze (no gradient, eval mode); -1
            freezes nothing, 0 the first patch embedding (the stem), ``i``
            stages 1 to ``i`` whole. Defaults to -1.
        norm_eval (bool): Keep the normalisation layers in eval mode while
            training. LayerNorm has no running statistics, so this changes
            no result; it is accepted for configs written for CNNs.
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to
            False.
        final_norm (bool): A LayerNorm on the last stage's output, as the
            PVT v1 classifier has (the release's ``norm``), for ImageNet
            training; stored as ``layers.3.2``, where mmdet keeps its stage
            norms. A state dict that has it loads into a backbone without
            it, which drops it, as mmdet's PVT does with the release's
            final norm. Defaults to False (mmdet's PVT has none).
        init_cfg (dict | list[dict], optional): Initialisation config; a
            ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``
            entry is loaded with strict key matching. Without it the
            weights are initialised as mmdet's PVT does (truncated normal,
            std 0.02, for linear layers and position embeddings; normal
            with std ``sqrt(2 / fan_out)`` for convolutions), and ACmix's
            shift kernels and rates as in the official ACmix. Defaults to
            None.

    Example:
        >>> import torch
        >>> model = ACmixPVT(arch='tiny').eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 97, 131))]
        [(1, 64, 25, 33), (1, 128, 13, 17), (1, 320, 7, 9), (1, 512, 4, 5)]
    """

    arch_zoo = {
        **dict.fromkeys(
            ['t', 'tiny'],
            {
                'embed_dims': (64, 128, 320, 512),
                'depths': (2, 2, 2, 2),
                'num_heads': (1, 2, 5, 8),
            },
        ),
        **dict.fromkeys(
            ['s', 'small'],
            {
                'embed_dims': (64, 128, 320, 512),
                'depths': (3, 4, 6, 3),
                'num_heads': (1, 2, 5, 8),
            },
        ),
    }

    def __init__(
        self,
        arch: str | dict = 'tiny',
        in_channels: int = 3,
        pretrain_img_size: int = 224,
        patch_sizes: Sequence[int] = (4, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        final_norm: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        arch = arch_settings(
            type(self), arch, ('embed_dims', 'depths', 'num_heads')
        )
        self.embed_dims = tuple(arch['embed_dims'])
        self.depths = tuple(arch['depths'])
        self.num_heads = tuple(arch['num_heads'])
        num_stages = len(self.depths)
        per_stage = {
            'embed_dims': self.embed_dims,
            'num_heads': self.num_heads,
            'patch_sizes': tuple(patch_sizes),
            'sr_ratios': tuple(sr_ratios),
            'mlp_ratios': tuple(mlp_ratios),
        }
        for name, values in per_stage.items():
            if len(values) != num_stages:
                raise ValueError(
                    f'{name} {values} must have one entry per stage, like '
                    f'depths {self.depths}'
                )
        self.out_indices = stage_arguments(
            num_stages, out_indices, frozen_stages
        )
        self.in_channels = in_channels
        self.patch_sizes = per_stage['patch_sizes']
        self.sr_ratios = per_stage['sr_ratios']
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.final_norm = final_norm
        self.out_channels = list(self.embed_dims)

        rates = torch.linspace(
            0, drop_path_rate, sum(self.depths), device='cpu'
        ).tolist()
        self.layers = ModuleList()
        stride, channels = 1, in_channels
        last_norm = None
        if final_norm:
            last_norm = nn.LayerNorm(self.embed_dims[-1], eps=LN_EPS)
        for stage, depth in enumerate(self.depths):
            dims = self.embed_dims[stage]
            stride *= self.patch_sizes[stage]
            first = sum(self.depths[:stage])
            blocks = [
                ACmixPVTBlock(
                    dims,
                    self.num_heads[stage],
                    self.sr_ratios[stage],
                    mlp_ratios[stage],
                    qkv_bias=qkv_bias,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    drop_path_rate=rates[first + index],
                    with_cp=with_cp,
                )
                for index in range(depth)
            ]
            self.layers.append(
                ACmixPVTStage(
                    PatchEmbed(
                        channels,
                        dims,
                        self.patch_sizes[stage],
                        eps=LN_EPS,
                        proj_name='projection',
                    ),
                    PositionEmbedding(
                        pretrain_img_size // stride, dims, drop_rate
                    ),
                    blocks,
                    norm=last_norm if stage == num_stages - 1 else None,
                )
            )
            channels = dims
        self.apply(self._pvt_init)
        self.register_load_state_dict_pre_hook(self._drop_final_norm)
        self._freeze_stages()

    @staticmethod
    def _pvt_init(module: nn.Module) -> None:
        # mmdet's PVT initialisation. ``apply`` visits a module after its
        # children, so an ACmix attention restores its one-hot shift
        # kernels and rates after its convolutions were drawn.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            fan_out = kernel * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, PositionEmbedding):
            nn.init.trunc_normal_(module.pos_embed, std=0.02)
        elif isinstance(module, ACmixBase):
            module.reset_mixing()

    def _drop_final_norm(
        self, module: nn.Module, state_dict: dict, prefix: str, *args
    ) -> None:
        # An ImageNet classifier's backbone (final_norm=True) loads into a
        # detection backbone, which does not normalise its last stage.
        if not self.final_norm:
            last = f'{prefix}layers.{len(self.layers) - 1}.2.'
            for key in [k for k in state_dict if k.startswith(last)]:
                del state_dict[key]

    def init_weights(self) -> None:
        """Initialises from ``init_cfg``; a ``Pretrained`` entry is loaded
        last, with strict key matching (see :func:`init_weights_strictly`).
        """
        init_weights_strictly(self, super().init_weights)

    def _freeze_stages(self) -> None:
        modules = []
        if self.frozen_stages == 0:
            modules.append(self.layers[0][0])
        modules += self.layers[: max(self.frozen_stages, 0)]
        freeze(modules)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Returns the outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): ``(B, in_channels, H, W)`` images; any H and W.

        Returns:
            tuple[Tensor]: NCHW maps with ``embed_dims[i]`` channels at the
            strides of the patch embeddings (4, 8, 16, 32 by default).
        """
        check_image_batch(x, self.in_channels, type(self).__name__)
        outs = []
        for stage, layer in enumerate(self.layers):
            x = layer(x)
            if stage in self.out_indices:
                outs.append(x)
        return tuple(outs)
