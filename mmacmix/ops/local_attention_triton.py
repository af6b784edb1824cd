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
  pixel it reflects; near the borders several do, hence the (relaxed) atomic
  adds into a float32 (float64) buffer.

Built to be cheap by construction:

* the reflection costs one integer remainder per pixel and axis, outside
  the window loops: each window row is then folded once (outer loop), and
  each column steps through the folded map by one (inner loop), with a
  comparison and a selection and no division;
* each sample (and head) starts at a 64-bit offset; offsets inside it are
  32-bit (the launcher refuses ``D * H * W >= 2 ** 31``), which also keeps
  one 64-bit base per tile instead of one per channel;
* tiles are 2-d, channels by pixels, with the pixels on a warp's lanes
  (``CHANNEL_AXIS``), and every tile shape keeps one head's channels
  inside a warp: its warps split only the pixels, so the reductions over
  channels stay within a thread or a warp (no shared memory);
* the tile shape and ``num_warps`` are autotuned per head width, kernel
  size, stride and dtype among at most three such shapes (one fixed shape
  in the interpreter, which cannot time them); the map's sizes are not
  specialised, so a new map size neither retunes nor recompiles;
* the kernels launch on the inputs' device;
* the atomic adds of the k/v gradients are relaxed (no ordering needed).

Every load is widened to float32 (float64 for float64 inputs), so
half-precision inputs accumulate in float32.

The module reads ``TRITON_INTERPRET`` when it is imported: with
``TRITON_INTERPRET=1`` the kernels run on CPU tensors in Triton's
interpreter, which the tests use. ``tests/test_ops/test_triton_gates.py``
compiles every kernel for Hopper (sm_90a) and checks registers, spills,
shared memory and layouts.
"""

import contextlib
import os
import re

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRETED = os.environ.get('TRITON_INTERPRET', '0') == '1'


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r'\d+', text)[:2])


# Which axis of a 2-d tile holds the channels. The window gathers have no
# contiguous axis, and Triton breaks that tie differently by version: 3.7
# lays the last axis along a warp's lanes, 3.6 the first. The pixels must
# get the lanes (and the channels stay inside a thread or a warp), so they
# take the axis that the installed Triton favours; the gates check the
# layouts (test_triton_gates.py, with 3.7, and by hand with 3.6).
CHANNEL_AXIS = 0 if _version(triton.__version__) >= (3, 7) else 1

# Most 32-bit words of one pixel's channels (a float64 channel takes two)
# that one thread holds per (channels, pixels) tile, by kernel. Each kernel
# keeps four to six such tiles alive; at 32 words the registers run out
# (tests/test_ops/test_triton_gates.py).
WORDS_PER_THREAD = {'forward': 16, 'backward_q': 16, 'backward_kv': 16}
# Candidate tiles, as (pixels, warps): below 32 pixels a warp's lanes split
# the channels too, so those take one warp; from 32 on, each lane takes one
# pixel and all its channels, and the warps split the pixels.
_TILES = ((2, 1), (4, 1), (8, 1), (16, 1), (64, 2), (128, 4))


def _tile_config(pixels: int, warps: int) -> triton.Config:
    block_w = min(pixels, 32)
    return triton.Config(
        {'BLOCK_H': pixels // block_w, 'BLOCK_W': block_w}, num_warps=warps
    )


def channels_per_thread(block_d: int, config: triton.Config) -> int:
    """Channels of one pixel that each thread holds under ``config``.

    A warp's 32 lanes go to the pixels first (Triton's default layout puts
    them on the contiguous axis), the rest to the channels.
    """
    pixels = config.kwargs['BLOCK_H'] * config.kwargs['BLOCK_W']
    lanes_on_channels = 32 // min(32, pixels)
    return max(1, block_d // lanes_on_channels)


def tile_fits(
    block_d: int, config: triton.Config, kernel: str, fp64: bool = False
) -> bool:
    """Whether ``config`` suits ``kernel`` at ``BLOCK_D = block_d``.

    It must keep one head's channels inside a warp (its warps split only
    the pixels), give each lane one pixel and leave none idle, and give each
    thread between half the kernel's budget of words and the budget (or
    half the head and the whole head, for heads narrower than the budget).
    """
    pixels = config.kwargs['BLOCK_H'] * config.kwargs['BLOCK_W']
    lanes_on_pixels = min(32, pixels)
    if pixels != lanes_on_pixels * config.num_warps:
        return False  # warps on the channels, or lanes with two pixels
    if 32 // lanes_on_pixels > block_d:
        return False  # idle lanes
    width = 2 if fp64 else 1
    budget = WORDS_PER_THREAD[kernel]
    words = channels_per_thread(block_d, config) * width
    return min(block_d * width, budget) // 2 <= words <= budget


def _prune_for(kernel: str):
    def prune(configs, named_args, **kwargs):
        block_d, fp64 = kwargs['BLOCK_D'], kwargs['FP64']
        kept = [c for c in configs if tile_fits(block_d, c, kernel, fp64)]
        # Heads wider than any tile's budget: the fewest channels a thread.
        return kept or [
            min(configs, key=lambda c: channels_per_thread(block_d, c))
        ]

    return prune


def _autotune(kernel: str, reset_to_zero: list[str] | None = None):
    """A small autotune over tile shapes and warps; in the interpreter
    (which cannot time anything) one large tile, fewer programs to run."""
    if INTERPRETED:
        return triton.autotune(
            configs=[_tile_config(256, 4)], key=['D', 'KERNEL', 'STRIDE']
        )
    return triton.autotune(
        configs=[_tile_config(*tile) for tile in _TILES],
        key=['D', 'KERNEL', 'STRIDE'],
        prune_configs_by={'early_config_prune': _prune_for(kernel)},
        reset_to_zero=reset_to_zero,
    )


# Sizes are never specialised: Triton would otherwise compile other kernels
# for sizes of 1 and multiples of 16, whose layouts it derives differently
# (vectorised along the pixels, or along the channels of a 1x1 map), with
# a warp's lanes across the channels and shared memory for the
# conversions; and a new size would cost a compile.
_SIZES = ['H', 'W', 'HO', 'WO']


@triton.jit
def _period(size):
    """Period of the reflection without edge repeat (1 for a size of 1)."""
    return tl.maximum(2 * (size - 1), 1)


@triton.jit
def _fold_start(x, size):
    """``x`` modulo the reflection's period, in ``[0, period)``: the one
    integer remainder of each pixel and axis."""
    period = _period(size)
    # C and Python disagree on the sign of x % period for negative x (the
    # interpreter follows Python): both are mended by one addition.
    x = x % period
    return tl.where(x < 0, x + period, x)


@triton.jit
def _fold_step(u, size):
    """The next position (``u + 1``) in ``[0, period)``, without dividing."""
    u = u + 1
    return tl.where(u >= _period(size), 0, u)


@triton.jit
def _reflect(u, size):
    """Map position ``u`` in ``[0, period)`` to its reflected index."""
    return tl.where(u < size, u, _period(size) - u)


@triton.jit
def _widen(x, FP64: tl.constexpr):
    if FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _on_channels(v, CH: tl.constexpr):
    """A vector over the channels as axis ``CH`` of a 2-d tile."""
    return tl.expand_dims(v, 1 - CH)


@triton.jit
def _on_pixels(v, CH: tl.constexpr):
    """A vector over the pixels as the other axis of a 2-d tile."""
    return tl.expand_dims(v, CH)


@triton.jit
def _output_tile(
    D,
    HO,
    WO,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    CH: tl.constexpr,
):
    """This program's tile of output pixels, all channels; the grid is
    ``(N, row tiles, column tiles)``.

    Returns:
        The output rows ``i`` and columns ``j`` of the pixels and their
        mask, the channels as a tile axis, the 32-bit offsets of the tile
        inside its sample of an ``(N, D, HO, WO)`` tensor, and the 64-bit
        start of the sample.
    """
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = tl.program_id(1) * BLOCK_H + p // BLOCK_W
    j = tl.program_id(2) * BLOCK_W + p % BLOCK_W
    d = _on_channels(tl.arange(0, BLOCK_D), CH)
    at = d * (HO * WO) + _on_pixels(i * WO + j, CH)
    sample = tl.program_id(0).to(tl.int64) * D * HO * WO
    return i, j, (i < HO) & (j < WO), d, at, sample


@triton.jit
def _window_sources(k_ptr, v_ptr, D, H, W, d):
    """Keys and values of this program's sample (a 64-bit start) and the
    32-bit offsets of the channel planes ``d`` inside it."""
    sample = tl.program_id(0).to(tl.int64) * D * H * W
    return k_ptr + sample, v_ptr + sample, d * (H * W)


@triton.jit
def _window_start(i, j, H, W, KERNEL: tl.constexpr, STRIDE: tl.constexpr):
    """Folded row and column of the window's first offset, per pixel."""
    row = _fold_start(STRIDE * i - KERNEL // 2, H)
    return row, _fold_start(STRIDE * j - KERNEL // 2, W)


@triton.jit(do_not_specialize=_SIZES)
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
    CH: tl.constexpr,
    FP64: tl.constexpr,
):
    i, j, pixels, d, at, sample = _output_tile(
        D, HO, WO, BLOCK_D, BLOCK_H, BLOCK_W, CH
    )
    mask = (d < D) & _on_pixels(pixels, CH)
    q = _widen(tl.load(q_ptr + sample + at, mask=mask, other=0.0), FP64)
    keys, values, planes = _window_sources(k_ptr, v_ptr, D, H, W, d)
    u_y, col_start = _window_start(i, j, H, W, KERNEL, STRIDE)
    peak = tl.sum(q, axis=CH) * 0.0 - float('inf')
    total = tl.sum(q, axis=CH) * 0.0
    acc = q * 0.0
    for _ in range(KERNEL):
        row = _reflect(u_y, H) * W  # once per window row
        u_x = col_start
        for _ in range(KERNEL):
            source = planes + _on_pixels(row + _reflect(u_x, W), CH)
            key = _widen(tl.load(keys + source, mask=mask, other=0.0), FP64)
            logit = tl.sum(q * key, axis=CH)
            new_peak = tl.maximum(peak, logit)
            decay = tl.exp(peak - new_peak)
            weight = tl.exp(logit - new_peak)
            value = _widen(
                tl.load(values + source, mask=mask, other=0.0), FP64
            )
            total = total * decay + weight
            acc = acc * _on_pixels(decay, CH) + _on_pixels(weight, CH) * value
            peak = new_peak
            u_x = _fold_step(u_x, W)
        u_y = _fold_step(u_y, H)
    out = acc / _on_pixels(total, CH)
    tl.store(
        out_ptr + sample + at, out.to(out_ptr.dtype.element_ty), mask=mask
    )
    at_pixel = tl.program_id(0).to(tl.int64) * HO * WO + (i * WO + j)
    tl.store(lse_ptr + at_pixel, peak + tl.log(total), mask=pixels)


@triton.jit(do_not_specialize=_SIZES)
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
    CH: tl.constexpr,
    FP64: tl.constexpr,
):
    i, j, pixels, d, at, sample = _output_tile(
        D, HO, WO, BLOCK_D, BLOCK_H, BLOCK_W, CH
    )
    mask = (d < D) & _on_pixels(pixels, CH)
    at_pixel = tl.program_id(0).to(tl.int64) * HO * WO + (i * WO + j)
    q = _widen(tl.load(q_ptr + sample + at, mask=mask, other=0.0), FP64)
    grad = _widen(
        tl.load(grad_out_ptr + sample + at, mask=mask, other=0.0), FP64
    )
    lse = tl.load(lse_ptr + at_pixel, mask=pixels, other=0.0)
    keys, values, planes = _window_sources(k_ptr, v_ptr, D, H, W, d)
    u_y, col_start = _window_start(i, j, H, W, KERNEL, STRIDE)
    delta = lse * 0.0
    weighted_keys = q * 0.0  # sum_t p_t dp_t k_t
    mean_key = q * 0.0  # sum_t p_t k_t
    for _ in range(KERNEL):
        row = _reflect(u_y, H) * W  # once per window row
        u_x = col_start
        for _ in range(KERNEL):
            source = planes + _on_pixels(row + _reflect(u_x, W), CH)
            key = _widen(tl.load(keys + source, mask=mask, other=0.0), FP64)
            value = _widen(
                tl.load(values + source, mask=mask, other=0.0), FP64
            )
            prob = tl.exp(tl.sum(q * key, axis=CH) - lse)
            grad_prob = tl.sum(grad * value, axis=CH)
            delta += prob * grad_prob
            weighted_keys += _on_pixels(prob * grad_prob, CH) * key
            mean_key += _on_pixels(prob, CH) * key
            u_x = _fold_step(u_x, W)
        u_y = _fold_step(u_y, H)
    grad_q = weighted_keys - _on_pixels(delta, CH) * mean_key
    tl.store(
        grad_q_ptr + sample + at,
        grad_q.to(grad_q_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(delta_ptr + at_pixel, delta, mask=pixels)


@triton.jit(do_not_specialize=_SIZES)
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
    CH: tl.constexpr,
    FP64: tl.constexpr,
):
    # The grid is (N * STRIDE ** 2 phases, row tiles, column tiles). Padded
    # position (STRIDE * a + phase_y, STRIDE * b + phase_x) is read by
    # offset ty of output row (STRIDE * a + phase_y - ty) / STRIDE, so only
    # offsets ty = phase_y (mod STRIDE) reach it, as integer rows.
    padded_h = STRIDE * (HO - 1) + KERNEL
    padded_w = STRIDE * (WO - 1) + KERNEL
    phases = tl.program_id(0)
    n = (phases // (STRIDE * STRIDE)).to(tl.int64)
    phase_y = (phases // STRIDE) % STRIDE
    phase_x = phases % STRIDE
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    a = tl.program_id(1) * BLOCK_H + p // BLOCK_W
    b = tl.program_id(2) * BLOCK_W + p % BLOCK_W
    yp = STRIDE * a + phase_y
    xp = STRIDE * b + phase_x
    positions = (yp < padded_h) & (xp < padded_w)
    d = _on_channels(tl.arange(0, BLOCK_D), CH)
    mask = (d < D) & _on_pixels(positions, CH)
    # A 64-bit start per sample, 32-bit offsets inside it; the reflection
    # of this program's positions, once.
    input_sample = n * D * H * W
    output_sample = n * D * HO * WO
    folded = _reflect(_fold_start(yp - KERNEL // 2, H), H) * W + _reflect(
        _fold_start(xp - KERNEL // 2, W), W
    )
    source = d * (H * W) + _on_pixels(folded, CH)
    key = _widen(
        tl.load(k_ptr + input_sample + source, mask=mask, other=0.0), FP64
    )
    value = _widen(
        tl.load(v_ptr + input_sample + source, mask=mask, other=0.0), FP64
    )
    queries = q_ptr + output_sample
    grads = grad_out_ptr + output_sample
    planes = d * (HO * WO)
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
            at = planes + _on_pixels(i * WO + j, CH)
            reads = (d < D) & _on_pixels(pixels, CH)
            q = _widen(tl.load(queries + at, mask=reads, other=0.0), FP64)
            grad = _widen(tl.load(grads + at, mask=reads, other=0.0), FP64)
            at_pixel = n * HO * WO + (i * WO + j)
            lse = tl.load(lse_ptr + at_pixel, mask=pixels, other=0.0)
            delta = tl.load(delta_ptr + at_pixel, mask=pixels, other=0.0)
            prob = tl.exp(tl.sum(q * key, axis=CH) - lse)
            prob = tl.where(pixels, prob, 0.0)
            grad_logit = prob * (tl.sum(grad * value, axis=CH) - delta)
            grad_key += _on_pixels(grad_logit, CH) * q
            grad_value += _on_pixels(prob, CH) * grad
    # Order is irrelevant to a sum: relaxed atomics need no fences.
    tl.atomic_add(
        grad_k_ptr + input_sample + source,
        grad_key,
        mask=mask,
        sem='relaxed',
    )
    tl.atomic_add(
        grad_v_ptr + input_sample + source,
        grad_value,
        mask=mask,
        sem='relaxed',
    )


forward_kernel = _autotune('forward')(_forward_kernel)
backward_q_kernel = _autotune('backward_q')(_backward_q_kernel)
backward_kv_kernel = _autotune(
    'backward_kv', reset_to_zero=['grad_k_ptr', 'grad_v_ptr']
)(_backward_kv_kernel)


def _block_d(d: int) -> int:
    return max(triton.next_power_of_2(d), 1)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes CUDA ``device`` current while the kernels launch (Triton
    launches on the current device, which need not be the inputs'); nothing
    for other devices (the interpreter's CPU tensors)."""
    if device.type == 'cuda':
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_sample(d: int, h: int, w: int) -> None:
    if d * h * w >= 2**31:
        raise ValueError(
            'the Triton local attention takes under 2**31 elements per '
            f'sample and head (32-bit offsets), got D x H x W = {d}x{h}x{w}'
        )


def forward(
    q: Tensor, k: Tensor, v: Tensor, kernel_size: int, stride: int
) -> tuple[Tensor, Tensor]:
    """Output ``(N, D, Ho, Wo)`` in q's dtype and log-sum-exp ``(N, Ho,
    Wo)`` in float32 (float64 for float64 inputs)."""
    q, k, v = (x.contiguous() for x in (q, k, v))
    n, d, h, w = k.shape
    ho, wo = q.shape[-2:]
    _check_sample(d, h, w)
    out = torch.empty_like(q)
    lse = q.new_empty((n, ho, wo), dtype=_accumulator_dtype(q.dtype))

    def grid(meta):
        return (
            n,
            triton.cdiv(ho, meta['BLOCK_H']),
            triton.cdiv(wo, meta['BLOCK_W']),
        )

    with device_guard(q.device):
        forward_kernel[grid](
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
            BLOCK_D=_block_d(d),
            CH=CHANNEL_AXIS,
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
    lse = lse.contiguous()
    n, d, h, w = k.shape
    ho, wo = q.shape[-2:]
    _check_sample(d, h, w)
    work = _accumulator_dtype(q.dtype)
    grad_q = torch.empty_like(q)
    delta = torch.empty_like(lse)
    grad_k = torch.zeros(k.shape, dtype=work, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=work, device=v.device)
    geometry = dict(
        KERNEL=kernel_size,
        STRIDE=stride,
        BLOCK_D=_block_d(d),
        CH=CHANNEL_AXIS,
        FP64=q.dtype == torch.float64,
    )
    rows = triton.cdiv(stride * (ho - 1) + kernel_size, stride)
    cols = triton.cdiv(stride * (wo - 1) + kernel_size, stride)

    def pixel_grid(meta):
        return (
            n,
            triton.cdiv(ho, meta['BLOCK_H']),
            triton.cdiv(wo, meta['BLOCK_W']),
        )

    def position_grid(meta):
        return (
            n * stride * stride,
            triton.cdiv(rows, meta['BLOCK_H']),
            triton.cdiv(cols, meta['BLOCK_W']),
        )

    with device_guard(q.device):
        backward_q_kernel[pixel_grid](
            grad_out, q, k, v, lse, grad_q, delta, d, h, w, ho, wo, **geometry
        )
        backward_kv_kernel[position_grid](
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
