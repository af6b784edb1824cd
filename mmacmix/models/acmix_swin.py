"""ACmix-Swin: Swin Transformer (v1) with ACmix window attention.

The official ImageNet models (``Swin-Transformer/models/
swin_transformer_acmix.py`` of the ACmix repository) keep Swin-T/S as they
are and give every block's window attention a convolution path: the q, k, v
projections of the whole (cyclically shifted) map also feed
:meth:`ACmixBase.conv_path` (computed as the equal, faster
:meth:`ACmixBase.fused_conv_path`), whose output is added after the
attention's output projection, ``rate1 * proj(attention) + rate2 *
convolution``.

:class:`ACmixSwinTransformer` is that model as a detection / segmentation
backbone with the API of mmdet's ``SwinTransformer``; its parameter names are
those of the official model, so its converter (``convert_acmix_swin`` in
:mod:`mmacmix.models.converters`) only drops the classifier and the saved
buffers and renames the final norm.
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

# Additive attention mask between tokens of different regions of a shifted
# window: the value of the official code (and mmdet's); softmax makes it ~0.
MASK_VALUE = -100.0
# Keys of an ACmix block that a plain Swin block lacks.
ACMIX_KEYS = (
    'attn.fc.weight',
    'attn.fc.bias',
    'attn.dep_conv.weight',
    'attn.rate1',
    'attn.rate2',
)


def relative_position_index(
    window: int,
    table_window: int | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Returns the ``(N, N)`` bias-table rows of a ``window`` x ``window``.

    Row ``(dy + T - 1) * (2T - 1) + (dx + T - 1)`` of the table of a window
    of side ``T`` holds the bias for a query ``(dy, dx)`` away from its key,
    as in Swin. A smaller window uses the central part of the same table.

    Args:
        window (int): Side of the window attended over.
        table_window (int, optional): Side of the window the table was made
            for. Defaults to ``window``.
        device (torch.device, optional): Device of the result.
    """
    table_window = table_window or window
    coords = torch.arange(window, device=device)
    ys, xs = torch.meshgrid(coords, coords, indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + table_window - 1
    dx = xs[:, None] - xs[None, :] + table_window - 1
    return dy * (2 * table_window - 1) + dx


def shifted_window_mask(
    height: int, width: int, window: int, shift: int, like: Tensor
) -> Tensor:
    """Returns the ``(num_windows, N, N)`` mask of shifted windows.

    After the map is rolled by ``-shift``, the last window of each axis holds
    tokens from both ends of the map; each axis splits into regions
    ``[0, size - window)``, ``[size - window, size - shift)`` and
    ``[size - shift, size)``, and tokens of different regions may not
    attend to each other.

    Args:
        height (int): Rows of the (padded) map, a multiple of ``window``.
        width (int): Columns of the (padded) map, a multiple of ``window``.
        window (int): Window side.
        shift (int): Shift of the windows, ``0 < shift < window``.
        like (Tensor): Tensor whose dtype and device the mask takes.
    """

    def regions(size: int) -> Tensor:
        # Comparisons rather than slice assignment: an ONNX export then
        # computes the mask from the traced size (see mmacmix.deploy).
        position = torch.arange(size, device=like.device)
        return (position >= size - window).long() + (
            position >= size - shift
        ).long()

    ids = regions(height)[:, None] * 3 + regions(width)[None, :]
    ids = ids.view(height // window, window, width // window, window)
    ids = ids.transpose(1, 2).reshape(-1, window * window)
    apart = ids[:, :, None] != ids[:, None, :]
    mask = torch.zeros(apart.shape, dtype=like.dtype, device=like.device)
    return mask.masked_fill(apart, MASK_VALUE)


class ACmixWindowAttention(ACmixBase):
    """(Shifted) window attention with the ACmix convolution path.

    The input is the normalised map after padding and cyclic shift; ``qkv``
    projects all of it once, the convolution path of :class:`ACmixBase` runs
    on the whole map (zero padding at its borders, which after the roll are
    not the image borders), and the attention runs within windows. The
    convolution output is added after ``proj``, as in the official model.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        window_size (int): Largest window side; the relative position bias
            table has ``(2 * window_size - 1) ** 2`` rows.
        qkv_bias (bool): Bias of the q, k, v projections. Defaults to True.
        attn_drop_rate (float): Dropout of the attention weights. Defaults
            to 0.
        proj_drop_rate (float): Dropout of the mixed output. Defaults to 0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        window_size: int,
        qkv_bias: bool = True,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(
            embed_dims, num_heads, fc_bias=True, init_cfg=init_cfg
        )
        self.window_size = window_size
        self.attn_drop_rate = attn_drop_rate
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Derived from window_size alone: kept out of the state dict.
        self.register_buffer(
            'relative_position_index',
            relative_position_index(window_size),
            persistent=False,
        )
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self, window: int) -> Tensor:
        """Returns the ``(num_heads, N, N)`` bias of a ``window`` side."""
        if window == self.window_size:
            index = self.relative_position_index
        else:
            index = relative_position_index(
                window,
                self.window_size,
                self.relative_position_bias_table.device,
            )
        tokens = window * window
        bias = self.relative_position_bias_table[index.view(-1)]
        return bias.view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(
        self, x: Tensor, window: int, mask: Tensor | None = None
    ) -> Tensor:
        """Applies ACmix to a map whose sides are multiples of ``window``.

        Args:
            x (Tensor): ``(B, H, W, C)``.
            window (int): Window side, at most ``window_size``.
            mask (Tensor, optional): ``(num_windows, N, N)`` additive mask
                of shifted windows.

        Returns:
            Tensor: ``(B, H, W, C)``.
        """
        b, h, w, _ = x.shape
        qkv = self.qkv(x)  # channel s * C + head * D + d
        conv = self.fused_conv_path(
            x.permute(0, 3, 1, 2), self.qkv.weight, self.qkv.bias
        )
        rows, cols = h // window, w // window
        tokens = window * window
        qkv = qkv.view(
            b, rows, window, cols, window, 3, self.num_heads, self.head_dims
        ).permute(5, 0, 1, 3, 6, 2, 4, 7)
        # CUDA's fused attention kernels take 4-d (batch, heads, tokens,
        # dims) inputs, with a bias that broadcasts over the batch. Without
        # a mask every window shares the (heads, N, N) position bias: batch
        # = windows. The shifted-window mask differs per window, so the
        # windows of an image join the heads and the batch is the images.
        bias = self.relative_position_bias(window)
        if mask is None:
            batch, heads = b * rows * cols, self.num_heads
        else:
            batch, heads = b, rows * cols * self.num_heads
            bias = (mask.unsqueeze(1) + bias).reshape(heads, tokens, tokens)
        q, k, v = qkv.reshape(3, batch, heads, tokens, self.head_dims)
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias,
            dropout_p=self.attn_drop_rate if self.training else 0.0,
        )
        # reshape: fused kernels may return a (batch, tokens, heads) layout.
        attn = attn.reshape(
            b, rows, cols, self.num_heads, window, window, self.head_dims
        )
        attn = attn.permute(0, 1, 4, 2, 5, 3, 6).reshape(
            b, h, w, self.embed_dims
        )
        out = self.mix(self.proj(attn), conv.permute(0, 2, 3, 1))
        return self.proj_drop(out)

    def extra_repr(self) -> str:
        return (
            f'{self.embed_dims}, num_heads={self.num_heads}, '
            f'window_size={self.window_size}'
        )


class Mlp(BaseModule):
    """The feed-forward network of a block: fc1, GELU, fc2, with dropout."""

    def __init__(
        self, embed_dims: int, hidden_dims: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class ACmixSwinBlock(BaseModule):
    """A Swin block whose window attention is :class:`ACmixWindowAttention`.

    The window side and shift come from the stage at every forward, since
    they depend on the size of the map.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        window_size (int): Largest window side.
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
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        with_cp: bool,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims)
        self.attn = ACmixWindowAttention(
            embed_dims,
            num_heads,
            window_size,
            qkv_bias=qkv_bias,
            attn_drop_rate=attn_drop_rate,
            proj_drop_rate=drop_rate,
        )
        self.drop_path = (
            DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        )
        self.norm2 = nn.LayerNorm(embed_dims)
        self.mlp = Mlp(embed_dims, int(embed_dims * mlp_ratio), drop_rate)

    def forward(
        self,
        x: Tensor,
        hw_shape: tuple[int, int],
        window: int,
        shift: int,
        mask: Tensor | None,
    ) -> Tensor:
        """Applies the block to ``(B, H * W, C)`` tokens.

        Args:
            x (Tensor): ``(B, H * W, C)``.
            hw_shape (tuple[int, int]): ``(H, W)``.
            window (int): Window side.
            shift (int): Cyclic shift, 0 for plain windows.
            mask (Tensor, optional): Mask of the shifted windows of the
                padded map (None when ``shift`` is 0).
        """

        def inner(x: Tensor) -> Tensor:
            h, w = hw_shape
            b, _, c = x.shape
            shortcut = x
            x = self.norm1(x).view(b, h, w, c)
            # Pad before the roll, like mmdet: the windows of the padded map
            # then tile it exactly for both the plain and the shifted blocks.
            x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
            if shift:
                x = torch.roll(x, (-shift, -shift), dims=(1, 2))
            x = self.attn(x, window, mask)
            if shift:
                x = torch.roll(x, (shift, shift), dims=(1, 2))
            x = x[:, :h, :w].reshape(b, h * w, c)
            x = shortcut + self.drop_path(x)
            return x + self.drop_path(self.mlp(self.norm2(x)))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


class PatchMerging(BaseModule):
    """Concatenates 2x2 neighbours, normalises and halves the channels.

    The concatenation order is the official one, ``(0, 0), (1, 0), (0, 1),
    (1, 1)`` as ``(row, column)`` offsets. Odd sides are zero-padded at the
    bottom and right first, like mmcv's ``PatchMerging``.
    """

    def __init__(self, embed_dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * embed_dims)
        self.reduction = nn.Linear(4 * embed_dims, 2 * embed_dims, bias=False)

    def forward(
        self, x: Tensor, hw_shape: tuple[int, int]
    ) -> tuple[Tensor, tuple[int, int]]:
        """Maps ``(B, H * W, C)`` to ``(B, ceil(H/2) * ceil(W/2), 2C)``."""
        h, w = hw_shape
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat(
            [
                x[:, 0::2, 0::2],
                x[:, 1::2, 0::2],
                x[:, 0::2, 1::2],
                x[:, 1::2, 1::2],
            ],
            dim=-1,
        )
        hw_shape = (x.shape[1], x.shape[2])
        x = x.view(b, -1, 4 * c)
        return self.reduction(self.norm(x)), hw_shape


class ACmixSwinStage(BaseModule):
    """Blocks alternating plain and shifted windows, then patch merging.

    Args:
        depth (int): Number of blocks.
        window_size (int): Window side for maps larger than it.
        drop_path_rates (Sequence[float]): Stochastic depth of each block.
        downsample (bool): Whether a :class:`PatchMerging` ends the stage.
        **block_kwargs: The other arguments of :class:`ACmixSwinBlock`.
    """

    def __init__(
        self,
        depth: int,
        window_size: int,
        drop_path_rates: Sequence[float],
        downsample: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.blocks = ModuleList(
            [
                ACmixSwinBlock(
                    window_size=window_size,
                    drop_path_rate=drop_path_rates[index],
                    **block_kwargs,
                )
                for index in range(depth)
            ]
        )
        embed_dims = block_kwargs['embed_dims']
        self.downsample = PatchMerging(embed_dims) if downsample else None

    def windowing(self, hw_shape: tuple[int, int]) -> tuple[int, int]:
        """Returns the window side and the shift of odd blocks.

        As in the official model, a map not larger than the window in one
        side is attended with square windows of that side and no shift.
        """
        smaller = min(hw_shape)
        if smaller <= self.window_size:
            return smaller, 0
        return self.window_size, self.window_size // 2

    def forward(
        self, x: Tensor, hw_shape: tuple[int, int]
    ) -> tuple[Tensor, tuple[int, int], Tensor, tuple[int, int]]:
        """Returns the blocks' output and the merged map, with their sizes.

        Returns:
            tuple: ``(out, out_hw, x, hw)``: the tokens before and after
            patch merging (the same tokens for the last stage).
        """
        window, shift = self.windowing(hw_shape)
        mask = None
        if shift:
            # Integer arithmetic on non-negative sizes only: it stays in
            # the graph when traced for ONNX (math.ceil would fix the size,
            # and floor division of negatives is exported as truncation).
            padded = [
                (side + window - 1) // window * window for side in hw_shape
            ]
            mask = shifted_window_mask(*padded, window, shift, x)
        for index, block in enumerate(self.blocks):
            shifted = index % 2 == 1
            x = block(
                x,
                hw_shape,
                window,
                shift if shifted else 0,
                mask if shifted else None,
            )
        if self.downsample is None:
            return x, hw_shape, x, hw_shape
        merged, merged_shape = self.downsample(x, hw_shape)
        return x, hw_shape, merged, merged_shape


@MODELS.register_module()
class ACmixSwinTransformer(FrozenStagesMixin, BaseModule):
    """ACmix-Swin backbone (Pan et al., CVPR 2022) with mmdet's Swin API.

    Swin Transformer v1 whose every block, plain and shifted, attends with
    :class:`ACmixWindowAttention`. With a 224x224 input it computes the
    official ``SwinTransformer_acmix`` exactly (its final ``norm`` is
    ``norm3`` here); other sizes work as follows.

    * Odd sizes: the patch embedding and the patch merging pad the bottom
      and right with zeros, so stage ``i`` has ``ceil(H / (4 * 2**i))`` rows.
    * Window side: a stage whose map is not larger than ``window_size`` in
      some side uses square windows of that side and no shift (the official
      rule, decided at every forward from the actual map); its relative
      position bias is the central part of the table.
    * Padding to whole windows: before the cyclic shift the normalised map
      is zero-padded at the bottom and right to multiples of the window, as
      in mmdet. The padded tokens are zeros of the normalised map, so their
      q, k, v are the biases of ``qkv``: windows that hold some attend to
      them (neither the official model nor mmdet masks them), and the
      convolution path, which runs on the whole padded and rolled map,
      mixes them into its 3x3 neighbourhoods. Its own zero
      padding applies at the borders of that rolled map, as in the official
      model. At 224x224 no stage is padded.

    State dict: parameters only (the relative position index and the
    attention masks are computed, not saved). Output norms ``norm{i}`` exist
    for the stages in ``out_indices``; when a state dict with norms of other
    stages is loaded (e.g. a converted checkpoint, which holds all four),
    those are dropped by a load-state-dict pre-hook, since they would be
    unused. A state dict with the last stage's norm alone (an ImageNet
    classifier's backbone) gets identity norms for the other stages.

    Args:
        arch (str | dict): ``'tiny'`` / ``'t'``, ``'small'`` / ``'s'``, or a
            dict with ``embed_dims``, ``depths`` and ``num_heads``.
            Defaults to ``'tiny'``.
        in_channels (int): Image channels. Defaults to 3.
        patch_size (int): Side of the patches of the stem. Defaults to 4.
        window_size (int): Window side. Defaults to 7.
        mlp_ratio (float): Hidden / input channels of the MLPs. Defaults
            to 4.
        qkv_bias (bool): Bias of the q, k, v projections. Defaults to True.
        drop_rate (float): Dropout after the embedding, the attention and in
            the MLPs. Defaults to 0.
        attn_drop_rate (float): Dropout of the attention weights. Defaults
            to 0.
        drop_path_rate (float): Stochastic depth of the last block, rising
            linearly from 0 at the first. Defaults to 0.1 (the official
            ImageNet training used 0.2 for T and 0.3 for S).
        out_indices (Sequence[int]): Stages whose normalised outputs are
            returned. Defaults to (0, 1, 2, 3).
        frozen_stages (int): Stages to freeze (no gradient, eval mode); -1
            freezes nothing, 0 the patch embedding, ``i`` also stages 1 to
            ``i`` and their output norms. Defaults to -1.
        norm_eval (bool): Keep the normalisation layers in eval mode while
            training. LayerNorm has no running statistics, so this changes
            no result; it is accepted for configs written for CNNs.
            Defaults to False.
        with_cp (bool): Gradient checkpointing of every block. Defaults to
            False.
        init_cfg (dict | list[dict], optional): Initialisation config; a
            ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``
            entry is loaded with strict key matching. Without it the
            weights are initialised as in the official model (truncated
            normal, std 0.02, for linear layers and the bias tables).
            Defaults to None.

    Example:
        >>> import torch
        >>> model = ACmixSwinTransformer(arch='tiny').eval()
        >>> [tuple(o.shape) for o in model(torch.rand(1, 3, 97, 131))]
        [(1, 96, 25, 33), (1, 192, 13, 17), (1, 384, 7, 9), (1, 768, 4, 5)]
    """

    arch_zoo = {
        **dict.fromkeys(
            ['t', 'tiny'],
            {
                'embed_dims': 96,
                'depths': (2, 2, 6, 2),
                'num_heads': (3, 6, 12, 24),
            },
        ),
        **dict.fromkeys(
            ['s', 'small'],
            {
                'embed_dims': 96,
                'depths': (2, 2, 18, 2),
                'num_heads': (3, 6, 12, 24),
            },
        ),
    }

    def __init__(
        self,
        arch: str | dict = 'tiny',
        in_channels: int = 3,
        patch_size: int = 4,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        init_cfg: dict | list[dict] | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        arch = arch_settings(
            type(self), arch, ('embed_dims', 'depths', 'num_heads')
        )
        self.embed_dims = arch['embed_dims']
        depths = tuple(arch['depths'])
        num_heads = tuple(arch['num_heads'])
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(
                f'depths {depths} and num_heads {num_heads} '
                'must have the same length'
            )
        out_indices = stage_arguments(num_stages, out_indices, frozen_stages)
        self.depths = depths
        self.num_heads = num_heads
        self.in_channels = in_channels
        self.window_size = window_size
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        self.patch_embed = PatchEmbed(in_channels, self.embed_dims, patch_size)
        self.drop_after_pos = nn.Dropout(drop_rate)
        rates = torch.linspace(
            0, drop_path_rate, sum(depths), device='cpu'
        ).tolist()
        self.layers = ModuleList()
        self.out_channels = []
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            dims = self.embed_dims * 2**stage
            first = sum(depths[:stage])
            self.layers.append(
                ACmixSwinStage(
                    depth,
                    window_size,
                    rates[first : first + depth],
                    downsample=stage < num_stages - 1,
                    embed_dims=dims,
                    num_heads=heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    with_cp=with_cp,
                )
            )
            self.out_channels.append(dims)
        for stage in out_indices:
            self.add_module(
                f'norm{stage}', nn.LayerNorm(self.out_channels[stage])
            )
        self.apply(self._official_init)
        self.register_load_state_dict_pre_hook(self._fit_output_norms)
        self._freeze_stages()

    @staticmethod
    def _official_init(module: nn.Module) -> None:
        # Swin's initialisation (the official model's too); the one-hot
        # shift kernels and the rates are ACmixBase's own.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _fit_output_norms(
        self, module: nn.Module, state_dict: dict, prefix: str, *args
    ) -> None:
        # Converted checkpoints hold an output norm per stage; those of
        # stages not in out_indices have no module here and are unused.
        # A classifier's backbone (out_indices=(3,), as mmpretrain trains
        # it) holds the last one only: the others start as identities, as
        # in the converted releases.
        last = len(self.layers) - 1
        held = [
            stage
            for stage in range(last + 1)
            if f'{prefix}norm{stage}.weight' in state_dict
        ]
        for stage in range(last + 1):
            name = f'{prefix}norm{stage}.'
            if stage not in self.out_indices:
                for key in [k for k in state_dict if k.startswith(name)]:
                    del state_dict[key]
            elif held == [last] and stage != last:
                norm = getattr(self, f'norm{stage}')
                state_dict[f'{name}weight'] = torch.ones_like(norm.weight)
                state_dict[f'{name}bias'] = torch.zeros_like(norm.bias)

    def init_weights(self) -> None:
        """Initialises from ``init_cfg``; a ``Pretrained`` entry is loaded
        last, with strict key matching (see :func:`init_weights_strictly`).
        """
        init_weights_strictly(self, super().init_weights)

    def _freeze_stages(self) -> None:
        modules = []
        if self.frozen_stages >= 0:
            modules += [self.patch_embed, self.drop_after_pos]
        for stage in range(max(self.frozen_stages, 0)):
            modules.append(self.layers[stage])
            if stage in self.out_indices:
                modules.append(getattr(self, f'norm{stage}'))
        freeze(modules)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Returns the normalised outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): ``(B, in_channels, H, W)`` images; any H and W.

        Returns:
            tuple[Tensor]: NCHW maps with ``embed_dims * 2**i`` channels at
            strides ``patch_size * 2**i`` (4, 8, 16, 32 by default).
        """
        check_image_batch(x, self.in_channels, type(self).__name__)
        x, hw_shape = self.patch_embed(x)
        x = self.drop_after_pos(x)
        outs = []
        for stage, layer in enumerate(self.layers):
            out, out_shape, x, hw_shape = layer(x, hw_shape)
            if stage in self.out_indices:
                out = getattr(self, f'norm{stage}')(out)
                out = out.view(-1, *out_shape, self.out_channels[stage])
                outs.append(out.permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
