"""Triton kernels of the sliding-window local attention (CUDA).

Three kernels, each streaming its tiles once, with nothing
``kernel_size ** 2``-fold in memory:

* forward: each program takes a tile of output pixels and all ``D``
  channels, and runs an online softmax over the window offsets; it writes
  the output and a per-pixel log-sum-exp;
* backward of q: the same tiles recompute the weights ``p_t`` from the
  log-sum-exp. With ``dp_t = grad_out . v_t`` and ``delta = sum_t p_t dp_t``,
  ``grad_q = sum_t p_t (dp_t - delta) k_t``, which is accumulated in one
  pass as ``sum_t p_t dp_t k_t - delta * sum_t p_t k_t``; ``delta`` is
  stored for the next kernel;
* backward of k and v: each program takes a tile of positions of the
  reflection-padded map (split by phase, so that for any stride one program's
  positions are read by the same window offsets) and gathers, from the
  output pixels whose windows cover them, ``grad_k += p_t (dp_t - delta) q``
  and ``grad_v += p_t grad_out``. A padded position adds onto the input
  pixel it reflects; near the borders several do, hence the atomic adds into
  a float32 (float64) buffer.

Tiles are laid out ``(channels, pixels)`` so that neighbouring threads read
neighbouring pixels of one channel plane. Every load is widened to float32
(float64 for float64 inputs), so half-precision inputs accumulate in float32.

The module reads ``TRITON_INTERPRET`` when it is imported: with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's
interpreter, which the tests use.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'


@triton.jit
def _fold(x, size):
    """Reflection without edge repeat, periodic beyond the map."""
    period = tl.maximum(2 * (size - 1), 1)
    # Two remainders: C and Python disagree on the sign of x % period for
    # negative x, and the interpreter follows Python.
    x = (x % period + period) % period
    return tl.where(x < size, x, period - x)


@triton.jit
def _widen(x, FP64: tl.constexpr):
    if FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _output_tile(
    D,
    HO,
    WO,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """This program's tile of output pixels, all channels.

    Returns:
        The output rows ``i`` and columns ``j`` of the pixels, the
        ``(BLOCK_D, pixels)`` element offsets in an ``(N, D, HO, WO)``
        tensor and their mask, the pixel offsets in an ``(N, HO, WO)``
        tensor and their mask, and the indices ``n * D + d`` of the map's
        channel planes.
    """
    tiles = tl.cdiv(HO, BLOCK_H) * tl.cdiv(WO, BLOCK_W)
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    tiles_w = tl.cdiv(WO, BLOCK_W)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    j = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    d = tl.arange(0, BLOCK_D)[:, None]
    pixels = (i < HO) & (j < WO)
    mask = (d < D) & pixels[None, :]
    at = n * D * HO * WO + d * HO * WO + (i * WO + j)[None, :]
    at_pixel = n * HO * WO + i * WO + j
    return i, j, at, mask, at_pixel, pixels, n * D + d


@triton.jit
def _window_position(
    i, j, t, H, W, KERNEL: tl.constexpr, STRIDE: tl.constexpr
):
    """Offset in an ``(H, W)`` plane of window offset ``t`` of output
    pixels ``(i, j)``."""
    y = _fold(STRIDE * i + t // KERNEL - KERNEL // 2, H)
    x = _fold(STRIDE * j + t % KERNEL - KERNEL // 2, W)
    return (y * W + x)[None, :]


@triton.jit
def _forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    D,
    H,
    W,
    HO,
    WO,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    FP64: tl.constexpr,
):
    i, j, at, mask, at_pixel, pixels, planes = _output_tile(
        D, HO, WO, BLOCK_D, BLOCK_H, BLOCK_W
    )
    q = _widen(tl.load(q_ptr + at, mask=mask, other=0.0), FP64)
    plane = planes * H * W
    peak = tl.sum(q, axis=0) * 0.0 - float('inf')
    total = tl.sum(q, axis=0) * 0.0
    acc = q * 0.0
    for t in range(KERNEL * KERNEL):
        source = plane + _window_position(i, j, t, H, W, KERNEL, STRIDE)
        key = _widen(tl.load(k_ptr + source, mask=mask, other=0.0), FP64)
        logit = tl.sum(q * key, axis=0)
        new_peak = tl.maximum(peak, logit)
        decay = tl.exp(peak - new_peak)
        weight = tl.exp(logit - new_peak)
        value = _widen(tl.load(v_ptr + source, mask=mask, other=0.0), FP64)
        total = total * decay + weight
        acc = acc * decay[None, :] + weight[None, :] * value
        peak = new_peak
    out = acc / total[None, :]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + at_pixel, peak + tl.log(total), mask=pixels)


@triton.jit
def _backward_q_kernel(
    grad_out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    grad_q_ptr,
    delta_ptr,
    D,
    H,
    W,
    HO,
    WO,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    FP64: tl.constexpr,
):
    i, j, at, mask, at_pixel, pixels, planes = _output_tile(
        D, HO, WO, BLOCK_D, BLOCK_H, BLOCK_W
    )
    q = _widen(tl.load(q_ptr + at, mask=mask, other=0.0), FP64)
    grad = _widen(tl.load(grad_out_ptr + at, mask=mask, other=0.0), FP64)
    lse = tl.load(lse_ptr + at_pixel, mask=pixels, other=0.0)
    plane = planes * H * W
    delta = lse * 0.0
    weighted_keys = q * 0.0  # sum_t p_t dp_t k_t
    mean_key = q * 0.0  # sum_t p_t k_t
    for t in range(KERNEL * KERNEL):
        source = plane + _window_position(i, j, t, H, W, KERNEL, STRIDE)
        key = _widen(tl.load(k_ptr + source, mask=mask, other=0.0), FP64)
        value = _widen(tl.load(v_ptr + source, mask=mask, other=0.0), FP64)
        prob = tl.exp(tl.sum(q * key, axis=0) - lse)
        grad_prob = tl.sum(grad * value, axis=0)
        delta += prob * grad_prob
        weighted_keys += (prob * grad_prob)[None, :] * key
        mean_key += prob[None, :] * key
    grad_q = weighted_keys - delta[None, :] * mean_key
    tl.store(
        grad_q_ptr + at, grad_q.to(grad_q_ptr.dtype.element_ty), mask=mask
    )
    tl.store(delta_ptr + at_pixel, delta, mask=pixels)


@triton.jit
def _backward_kv_kernel(
    grad_out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    delta_ptr,
    grad_k_ptr,
    grad_v_ptr,
    D,
    H,
    W,
    HO,
    WO,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    FP64: tl.constexpr,
):
    # Padded position (STRIDE * a + phase_y, STRIDE * b + phase_x) is read
    # by offset ty of output row (STRIDE * a + phase_y - ty) / STRIDE, so
    # only offsets ty = phase_y (mod STRIDE) reach it, as integer rows.
    padded_h = STRIDE * (HO - 1) + KERNEL
    padded_w = STRIDE * (WO - 1) + KERNEL
    rows = tl.cdiv(padded_h, STRIDE)
    cols = tl.cdiv(padded_w, STRIDE)
    pid = tl.program_id(0)
    tiles = tl.cdiv(rows, BLOCK_H) * tl.cdiv(cols, BLOCK_W)
    phases = pid // tiles
    n = (phases // (STRIDE * STRIDE)).to(tl.int64)
    phase_y = (phases // STRIDE) % STRIDE
    phase_x = phases % STRIDE
    tiles_w = tl.cdiv(cols, BLOCK_W)
    tile = pid % tiles
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    a = (tile // tiles_w) * BLOCK_H + p // BLOCK_W
    b = (tile % tiles_w) * BLOCK_W + p % BLOCK_W
    yp = STRIDE * a + phase_y
    xp = STRIDE * b + phase_x
    positions = (yp < padded_h) & (xp < padded_w)
    d = tl.arange(0, BLOCK_D)[:, None]
    channels = d < D
    y = _fold(yp - KERNEL // 2, H)
    x = _fold(xp - KERNEL // 2, W)
    source = n * D * H * W + d * H * W + (y * W + x)[None, :]
    mask = channels & positions[None, :]
    key = _widen(tl.load(k_ptr + source, mask=mask, other=0.0), FP64)
    value = _widen(tl.load(v_ptr + source, mask=mask, other=0.0), FP64)
    grad_key = key * 0.0
    grad_value = key * 0.0
    # Offset ty = phase_y + STRIDE * m reaches output row a - m. Loop
    # bounds stay compile-time constants; offsets past the window are
    # masked.
    for m in range((KERNEL + STRIDE - 1) // STRIDE):
        i = a - m
        row_ok = (phase_y + STRIDE * m < KERNEL) & (i >= 0) & (i < HO)
        for m_x in range((KERNEL + STRIDE - 1) // STRIDE):
            j = b - m_x
            col_ok = (phase_x + STRIDE * m_x < KERNEL) & (j >= 0) & (j < WO)
            pixels = positions & row_ok & col_ok
            at = n * D * HO * WO + d * HO * WO + (i * WO + j)[None, :]
            reads = channels & pixels[None, :]
            q = _widen(tl.load(q_ptr + at, mask=reads, other=0.0), FP64)
            grad = _widen(
                tl.load(grad_out_ptr + at, mask=reads, other=0.0), FP64
            )
            at_pixel = n * HO * WO + i * WO + j
            lse = tl.load(lse_ptr + at_pixel, mask=pixels, other=0.0)
            delta = tl.load(delta_ptr + at_pixel, mask=pixels, other=0.0)
            prob = tl.exp(tl.sum(q * key, axis=0) - lse)
            prob = tl.where(pixels, prob, 0.0)
            grad_logit = prob * (tl.sum(grad * value, axis=0) - delta)
            grad_key += grad_logit[None, :] * q
            grad_value += prob[None, :] * grad
    tl.atomic_add(grad_k_ptr + source, grad_key, mask=mask)
    tl.atomic_add(grad_v_ptr + source, grad_value, mask=mask)


def _blocks(d: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_H, BLOCK_W)`` for head width ``d``.

    About 2k elements per tile on a GPU (registers); the interpreter runs
    one program at a time, so it gets bigger tiles.
    """
    block_d = max(triton.next_power_of_2(d), 1)
    budget = 16384 if INTERPRETED else 2048
    pixels = max(16, min(256, budget // block_d))
    block_w = min(pixels, 32)
    return block_d, pixels // block_w, block_w


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """Output ``(N, D, Ho, Wo)`` in q's dtype and log-sum-exp ``(N, Ho,
    Wo)`` in float32 (float64 for float64 inputs)."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    n, d, h, w = k.shape
    ho, wo = q.shape[-2:]
    out = torch.empty_like(q)
    lse = q.new_empty((n, ho, wo), dtype=_accumulator_dtype(q.dtype))
    block_d, block_h, block_w = _blocks(d)
    grid = (n * triton.cdiv(ho, block_h) * triton.cdiv(wo, block_w),)
    _forward_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        d,
        h,
        w,
        ho,
        wo,
        KERNEL=kernel_size,
        STRIDE=stride,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        FP64=q.dtype == torch.float64,
    )
    return out, lse


def backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    kernel_size: int,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k and v, each in its input's dtype."""
    grad_out, q, k, v = (x.contiguous() for x in (grad_out, q, k, v))
    n, d, h, w = k.shape
    ho, wo = q.shape[-2:]
    work = _accumulator_dtype(q.dtype)
    grad_q = torch.empty_like(q)
    delta = torch.empty_like(lse)
    grad_k = torch.zeros(k.shape, dtype=work, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=work, device=v.device)
    block_d, block_h, block_w = _blocks(d)
    geometry = dict(
        KERNEL=kernel_size,
        STRIDE=stride,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        BLOCK_W=block_w,
        FP64=q.dtype == torch.float64,
    )
    grid = (n * triton.cdiv(ho, block_h) * triton.cdiv(wo, block_w),)
    _backward_q_kernel[grid](
        grad_out, q, k, v, lse, grad_q, delta, d, h, w, ho, wo, **geometry
    )
    rows = triton.cdiv(stride * (ho - 1) + kernel_size, stride)
    cols = triton.cdiv(stride * (wo - 1) + kernel_size, stride)
    tiles = triton.cdiv(rows, block_h) * triton.cdiv(cols, block_w)
    grid = (n * stride * stride * tiles,)
    _backward_kv_kernel[grid](
        grad_out,
        q,
        k,
        v,
        lse,
        delta,
        grad_k,
        grad_v,
        d,
        h,
        w,
        ho,
        wo,
        **geometry,
    )
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)
