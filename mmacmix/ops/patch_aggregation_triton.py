"""Triton kernels of SAN's patch aggregation (CUDA).

Channel ``c = s * G + g`` of ``values`` (``(B, S * G, H, W)``) is summed
with the weights of group ``g`` (``weights`` is ``(B, G, k^2, H, W)``).
Each program takes one batch element, one group, all ``S`` channels of
that group and a tile of pixels, so that a weight is loaded once for the
``S`` channels it serves. Two kernels, each streaming over the window
offsets with nothing ``k^2``-fold in memory:

* forward: each program accumulates ``sum_t w_t * v_t`` for its output
  pixels and stores it once;
* backward: each program takes a tile of positions of the
  reflection-padded map. Padded position ``(yp, xp)`` is window offset
  ``(ty, tx)`` of exactly one output pixel, ``(yp - ty, xp - tx)`` where
  that pixel exists, so the program computes that weight's gradient
  (``sum_s grad_out * v``, stored once, no atomics) and gathers
  ``sum_t w_t * grad_out`` into the gradient of the value the padded
  position copies. Near the borders several padded positions copy one
  value, hence atomic adds into a float32 (float64) buffer.

Every load is widened to float32 (float64 for float64 inputs), so
half-precision inputs accumulate in float32. Element offsets are int32
inside a ``(H, W)`` plane (or a group's ``k^2`` planes of weights) from an
int64 base per plane.

The module reads ``TRITON_INTERPRET`` when it is imported: with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's
interpreter, which the tests use.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .local_attention_triton import _widen

INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'
# Sizes Triton would specialise when equal to 1 or divisible by 16: the
# kernels take them as plain integers, so that such maps (and one group)
# run the kernels every other map runs.
_SIZES = ['G', 'H', 'W']


@triton.jit
def _reflect(x, size, PERIODIC: tl.constexpr):
    """Reflection without edge repeat. ``PERIODIC`` folds any distance (the
    window is wider than the map); otherwise one reflection suffices."""
    if PERIODIC:
        period = tl.maximum(2 * (size - 1), 1)
        # Two remainders: C and Python disagree on the sign of x % period
        # for negative x, and the interpreter follows Python.
        x = (x % period + period) % period
        y = tl.where(x < size, x, period - x)
    else:
        x = tl.where(x < 0, -x, x)
        y = tl.where(x >= size, 2 * (size - 1) - x, x)
    return y


@triton.jit(do_not_specialize=_SIZES)
def _forward_kernel(
    values_ptr,
    weights_ptr,
    out_ptr,
    G,
    H,
    W,
    KERNEL: tl.constexpr,
    SHARE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PERIODIC: tl.constexpr,
    FP64: tl.constexpr,
):
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_w
    pid = tl.program_id(0)
    group = (pid // tiles).to(tl.int64)  # b * G + g
    tile = pid % tiles
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    j = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    pixels = (i < H) & (j < W)
    s = tl.arange(0, BLOCK_S)[:, None]
    mask = (s < SHARE) & pixels[None, :]
    plane = H * W
    # Channel s * G + g of batch element b is plane (b * S + s) * G + g.
    b = group // G
    planes = ((b * SHARE + s) * G + group % G) * plane
    weights_base = weights_ptr + group * (KERNEL * KERNEL) * plane
    at = i * W + j
    acc = tl.zeros((BLOCK_S, BLOCK_H * BLOCK_W), tl.float32)
    if FP64:
        acc = acc.to(tl.float64)
    for ty in range(KERNEL):
        row = _reflect(i + ty - KERNEL // 2, H, PERIODIC) * W
        for tx in range(KERNEL):
            col = _reflect(j + tx - KERNEL // 2, W, PERIODIC)
            weight = tl.load(
                weights_base + (ty * KERNEL + tx) * plane + at,
                mask=pixels,
                other=0.0,
            )
            value = tl.load(
                values_ptr + planes + (row + col)[None, :],
                mask=mask,
                other=0.0,
            )
            acc += _widen(weight, FP64)[None, :] * _widen(value, FP64)
    tl.store(
        out_ptr + planes + at[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit(do_not_specialize=_SIZES)
def _backward_kernel(
    grad_out_ptr,
    values_ptr,
    weights_ptr,
    grad_values_ptr,
    grad_weights_ptr,
    G,
    H,
    W,
    KERNEL: tl.constexpr,
    SHARE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    PERIODIC: tl.constexpr,
    FP64: tl.constexpr,
):
    padded_h = H + KERNEL - 1
    padded_w = W + KERNEL - 1
    tiles_w = tl.cdiv(padded_w, BLOCK_W)
    tiles = tl.cdiv(padded_h, BLOCK_H) * tiles_w
    pid = tl.program_id(0)
    group = (pid // tiles).to(tl.int64)  # b * G + g
    tile = pid % tiles
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    yp = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    xp = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    positions = (yp < padded_h) & (xp < padded_w)
    s = tl.arange(0, BLOCK_S)[:, None]
    channels = s < SHARE
    plane = H * W
    b = group // G
    planes = ((b * SHARE + s) * G + group % G) * plane
    weights_base = group * (KERNEL * KERNEL) * plane
    y = _reflect(yp - KERNEL // 2, H, PERIODIC)
    x = _reflect(xp - KERNEL // 2, W, PERIODIC)
    source = planes + (y * W + x)[None, :]
    value = _widen(
        tl.load(
            values_ptr + source,
            mask=channels & positions[None, :],
            other=0.0,
        ),
        FP64,
    )
    grad_value = value * 0.0
    for ty in range(KERNEL):
        i = yp - ty
        row_ok = positions & (i >= 0) & (i < H)
        for tx in range(KERNEL):
            j = xp - tx
            reads = row_ok & (j >= 0) & (j < W)
            at = i * W + j
            grad = _widen(
                tl.load(
                    grad_out_ptr + planes + at[None, :],
                    mask=channels & reads[None, :],
                    other=0.0,
                ),
                FP64,
            )
            at_weight = weights_base + (ty * KERNEL + tx) * plane + at
            weight = _widen(
                tl.load(weights_ptr + at_weight, mask=reads, other=0.0), FP64
            )
            grad_value += weight[None, :] * grad
            grad_weight = tl.sum(grad * value, axis=0)
            tl.store(
                grad_weights_ptr + at_weight,
                grad_weight.to(grad_weights_ptr.dtype.element_ty),
                mask=reads,
            )
    tl.atomic_add(
        grad_values_ptr + source,
        grad_value,
        mask=channels & positions[None, :],
        sem='relaxed',
    )


def _blocks(share: int, height: int, width: int) -> tuple[int, int, int]:
    """``(BLOCK_S, BLOCK_H, BLOCK_W)`` for ``share`` channels a group.

    On a GPU, 256 pixels of 32 columns whatever the map (about 2k elements
    a tile for 8 channels: registers). The interpreter runs one program at
    a time at a cost that grows with the tile, so its tiles are as large
    as the ``height x width`` map (padded, for the backward) allows.
    """
    block_s = triton.next_power_of_2(share)
    if not INTERPRETED:
        pixels = max(16, min(256, 2048 // block_s))
        return block_s, pixels // 32, 32
    block_w = min(triton.next_power_of_2(width), 64)
    block_h = min(triton.next_power_of_2(height), max(1, 4096 // block_w))
    return block_s, block_h, block_w


def _device_guard(x: Tensor) -> contextlib.AbstractContextManager:
    """Launches on the device of ``x``, not on the current CUDA device."""
    if x.device.type == 'cuda':
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def _geometry(values: Tensor, weights: Tensor, kernel_size: int) -> dict:
    h, w = values.shape[-2:]
    if kernel_size**2 * h * w >= 2**31:
        raise ValueError(
            f'a {h}x{w} map with a {kernel_size}x{kernel_size} window is '
            'too large for the int32 offsets of the Triton kernels'
        )
    share = values.shape[1] // weights.shape[1]
    padded = kernel_size - 1
    block_s, block_h, block_w = _blocks(share, h + padded, w + padded)
    return dict(
        KERNEL=kernel_size,
        SHARE=share,
        BLOCK_S=block_s,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        PERIODIC=kernel_size // 2 >= min(values.shape[-2:]),
        FP64=values.dtype == torch.float64,
    )


def forward(values: Tensor, weights: Tensor, kernel_size: int) -> Tensor:
    """The aggregation, ``(B, C, H, W)`` in the dtype of ``values``."""
    values, weights = values.contiguous(), weights.contiguous()
    b, _, h, w = values.shape
    groups = weights.shape[1]
    out = torch.empty_like(values)
    geometry = _geometry(values, weights, kernel_size)
    tiles = triton.cdiv(h, geometry['BLOCK_H']) * triton.cdiv(
        w, geometry['BLOCK_W']
    )
    with _device_guard(values):
        _forward_kernel[(b * groups * tiles,)](
            values, weights, out, groups, h, w, **geometry
        )
    return out


def backward(
    grad_out: Tensor, values: Tensor, weights: Tensor, kernel_size: int
) -> tuple[Tensor, Tensor]:
    """Gradients of values and weights, each in its input's dtype."""
    grad_out, values, weights = (
        x.contiguous() for x in (grad_out, values, weights)
    )
    b, _, h, w = values.shape
    groups = weights.shape[1]
    work = torch.float64 if values.dtype == torch.float64 else torch.float32
    grad_values = torch.zeros(values.shape, dtype=work, device=values.device)
    grad_weights = torch.empty_like(weights)
    geometry = _geometry(values, weights, kernel_size)
    tiles = triton.cdiv(
        h + kernel_size - 1, geometry['BLOCK_H']
    ) * triton.cdiv(w + kernel_size - 1, geometry['BLOCK_W'])
    with _device_guard(values):
        _backward_kernel[(b * groups * tiles,)](
            grad_out,
            values,
            weights,
            grad_values,
            grad_weights,
            groups,
            h,
            w,
            **geometry,
        )
    return grad_values.to(values.dtype), grad_weights
