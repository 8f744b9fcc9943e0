"""fp32-accurate products on bf16 tensor cores, shared by the kernels.

An fp32 value splits exactly into three bf16 parts (8 + 8 + 8 mantissa bits); two parts keep ~16
bits. Products of such parts are exact in the fp32 accumulator, so a matrix product of an fp32
tile with a bf16 tile costs 2-3 bf16 tensor-core products and loses nothing a bf16 stream can see
(one TF32 pass, by contrast, rounds the fp32 operand to 10 bits: errors of 1e-3 that the Sinkhorn
iteration amplifies).

Precision modes of the kernels (``MODE`` constexpr):
    MODE_FMA    fp32 products on CUDA cores (``input_precision="ieee"``); used by Triton's CPU
                interpreter, whose bf16 tensor-core products are wrong
    MODE_BF16   the stream operand is bf16 (exact); fp32 operands are split into parts
    MODE_SPLIT  fp16/fp32 streams: both operands are split into two bf16 parts
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchmhc.kernels._common import cdiv, interpreting

MODE_FMA = 0
MODE_BF16 = 1
MODE_SPLIT = 2


def precision_mode(x: Tensor) -> int:
    """The ``MODE`` constexpr for a stream tensor ``x``."""
    if interpreting():
        return MODE_FMA
    return MODE_BF16 if x.dtype == torch.bfloat16 else MODE_SPLIT


@triton.jit
def split2(a):
    """fp32 -> (hi, lo) bf16 with hi + lo = a to ~16 bits."""
    hi = a.to(tl.bfloat16)
    return hi, (a - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _split_bf16_kernel(a_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    hi, lo = split2(tl.load(a_ptr + offs, mask=mask))
    tl.store(out_ptr + offs, hi, mask=mask)
    tl.store(out_ptr + numel + offs, lo, mask=mask)


def split_bf16(a: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 ``a`` (contiguous) -> its bf16 (hi, lo) parts (:func:`split2`), each shaped like ``a``,
    in one kernel (for parameters that many programs read as tensor-core operands)."""
    out = torch.empty((2, *a.shape), dtype=torch.bfloat16, device=a.device)
    block = 1024
    _split_bf16_kernel[(cdiv(a.numel(), block),)](a, out, a.numel(), BLOCK=block)
    return out[0], out[1]


@triton.jit
def split3(a):
    """fp32 -> three bf16 parts whose sum is exactly a (normal range)."""
    p1 = a.to(tl.bfloat16)
    r = a - p1.to(tl.float32)
    p2 = r.to(tl.bfloat16)
    return p1, p2, (r - p2.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def dot_f32_bf16(a, b, acc, MODE: tl.constexpr):
    """acc += a @ b for an fp32 tile ``a`` and a stream tile ``b`` (bf16 in MODE_BF16)."""
    if MODE == 0:
        acc = tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    elif MODE == 1:
        a1, a2, a3 = split3(a)
        acc = tl.dot(a1, b, acc)
        acc = tl.dot(a2, b, acc)
        acc = tl.dot(a3, b, acc)
    else:
        a_hi, a_lo = split2(a)
        b_hi, b_lo = split2(b.to(tl.float32))
        acc = tl.dot(a_hi, b_hi, acc)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_lo, b_hi, acc)
    return acc


@triton.jit
def dot_bf16_f32(b, a, acc, MODE: tl.constexpr):
    """acc += b @ a for a stream tile ``b`` and an fp32 tile ``a``, with the stream as the left
    operand, so that a wide stream tile gives the large M that Hopper's warp-group products need.
    ``a`` keeps ~16 bits (two parts; a bf16 ``b`` is exact): made for weight gradients, which sum
    many such products and tolerate far less precision (docs/math.md §10 allows TF32's 10 bits)."""
    if MODE == 0:
        acc = tl.dot(b.to(tl.float32), a, acc, input_precision="ieee")
    elif MODE == 1:
        a_hi, a_lo = split2(a)
        acc = tl.dot(b, a_hi, acc)
        acc = tl.dot(b, a_lo, acc)
    else:
        a_hi, a_lo = split2(a)
        b_hi, b_lo = split2(b.to(tl.float32))
        acc = tl.dot(b_hi, a_hi, acc)
        acc = tl.dot(b_lo, a_hi, acc)
        acc = tl.dot(b_hi, a_lo, acc)
    return acc


@triton.jit
def dot_stream_fn(x, fn_ptrs, lo_ptrs, mask, acc, MODE: tl.constexpr):
    """acc += x @ w for a stream tile ``x`` and a weight tile ``w`` of fn read from memory (the
    coefficient projections). MODE_FMA: fp32 fn at ``fn_ptrs``. Else ``fn_ptrs``/``lo_ptrs`` hold fn's
    bf16 hi and lo parts, split once by the launcher: the tiles then go from memory to shared
    memory asynchronously (pipelined) for the tensor cores; an fp32 tile split in registers each
    step cost 28% at T = 16384, C = 4096 (H100). A bf16 x is exact, an fp16/fp32 x is split in two:
    2 or 3 bf16 tensor-core products."""
    w = tl.load(fn_ptrs, mask=mask, other=0.0)
    if MODE == 0:
        acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
    elif MODE == 1:
        acc = tl.dot(x, w, acc)
        acc = tl.dot(x, tl.load(lo_ptrs, mask=mask, other=0.0), acc)
    else:
        x_hi, x_lo = split2(x.to(tl.float32))
        acc = tl.dot(x_hi, w, acc)
        acc = tl.dot(x_hi, tl.load(lo_ptrs, mask=mask, other=0.0), acc)
        acc = tl.dot(x_lo, w, acc)
    return acc
