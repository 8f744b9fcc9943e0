"""Helpers shared by the kernel files: token flattening, tile sizes, interpreter detection, and the
registration of the fused ops, and the choice between an op's launcher (eager) and its registered op
(torch.compile).

Every launcher works on tokens ``[T, n, C]``; :func:`flatten_tokens` is the one place where the
leading dims ``[...]`` are folded into ``T`` and :func:`unflatten_tokens` the one place they come back.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:  # triton is optional: imported where kernels launch, not by `import torchmhc`
    from triton.tools.tensor_descriptor import TensorDescriptor

#: Streams the kernels handle (the coefficient kernel keeps an n x n Sinkhorn tile in registers).
MAX_STREAMS = 8
#: The fast path reads C in chunks that are powers of two of at least this size.
CHANNEL_MULTIPLE = 64


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (``triton.cdiv`` is a constexpr function whose host calls
    cost several µs each)."""
    return -(-a // b)


def next_pow2(v: int) -> int:
    """Smallest power of two >= v (v >= 1)."""
    return 1 << (v - 1).bit_length()


def channel_block(c: int, limit: int = 1024) -> int:
    """Largest power of two <= ``limit`` dividing ``c``: C chunks need no mask (C % 64 == 0)."""
    block = limit
    while c % block:
        block //= 2
    return block


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def token_block(default: int) -> int:
    """Tokens (rows) per program: ``default``, or under the interpreter, which pays per element,
    the smallest tile ``tl.dot`` accepts (16)."""
    return 16 if interpreting() else default


def token_runs(t_blocks: int, column_blocks: int, device: torch.device, waves: int | None) -> tuple[int, int]:
    """``(tiles, groups)`` for a kernel whose programs each own one column block for a run of
    ``tiles`` consecutive token tiles (so their weight-gradient sums need no atomics): enough
    programs for ``waves`` waves (default 2, or 4 when there are fewer column blocks than
    multiprocessors). ``tiles`` is a compile-time constant: rounding it up to a multiple of an
    eighth of its power of two keeps the distinct values (compilations) few while the last wave
    stays at most 1/8 short (a power of two left whole waves idle at C = 1280). H100 sweeps of the
    coefficient dx pass: 2 waves at C = 4096 (128 column blocks); 4 at C = 1280 (40), 3% faster."""
    waves = waves or (4 if column_blocks < num_sms(device) else 2)
    tiles = cdiv(t_blocks, max(1, (waves * num_sms(device)) // column_blocks))
    quantum = max(1, next_pow2(tiles) // 8)
    tiles = cdiv(tiles, quantum) * quantum
    return tiles, cdiv(t_blocks, tiles)


@functools.cache  # asked on every launch: keep the host path short
def num_sms(device: torch.device) -> int:
    """Multiprocessor count (a small stand-in under the interpreter, to keep CPU tests fast)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def tile_descriptor(t: Tensor, block_shape: list[int]) -> TensorDescriptor:
    """Descriptor through which a kernel moves ``block_shape`` tiles of ``t`` by the copy engine
    (TMA on Hopper; out-of-range rows read as zeros and are not written). The copy engine needs a
    16-byte aligned base and row strides: ``t`` is copied first if its base is not aligned (a view
    at an odd offset; outputs are fresh allocations, never copied); the launchers' row lengths
    (C, a multiple of 64) keep the strides aligned."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if t.data_ptr() % 16:
        t = t.clone()
    return TensorDescriptor.from_tensor(t.contiguous(), block_shape)


F = TypeVar("F", bound=Callable)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

#: Where the fused ops are registered: ``torch.ops.torchmhc.<name>``.
_LIBRARY = torch.library.Library("torchmhc", "FRAGMENT")


def define_op(name: str, schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Registers the fused op ``torchmhc::<name><schema>`` and returns it
    (``torch.ops.torchmhc.<name>.default``): ``impl`` for CUDA tensors and for CPU tensors (Triton's
    interpreter), ``fake`` for torch.compile's shape propagation. A written schema and a plain impl
    rather than ``torch.library.custom_op``, whose Python wrapper costs about 25 µs of host time a
    call (one CPU core, measured) that a compiled graph pays at every launch of the op."""
    _LIBRARY.define(name + schema)
    for key in ("CUDA", "CPU"):
        _LIBRARY.impl(name, impl, key)
    torch.library.register_fake(f"torchmhc::{name}", fake, lib=_LIBRARY)
    return getattr(torch.ops.torchmhc, name).default


def eager_or_compiled(op: F, eager: F, probe: Tensor) -> F:
    """What a fused op calls: ``op``, its registered op (:func:`define_op`), while torch.compile
    traces, else ``eager``: the launcher, or an autograd.Function with the op's own context and
    backward. The op's dispatch (and its autograd kernel) costs host time on every eager call and
    buys nothing there. Tracing is either dynamo's (``torch.compiler.is_compiling()``) or AOT
    autograd's run of a registered op's backward, which torch 2.11 does outside ``is_compiling``
    but always on fake (or functional) tensors: ``probe``, a tensor argument, tells."""
    if torch.compiler.is_compiling() or type(probe) not in _PLAIN_TENSORS:
        return op
    return eager


def grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """An output gradient for a backward op: ``grad`` contiguous, or zeros shaped like
    ``like`` where autograd passed None (the output was not used)."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def flatten_tokens(x: Tensor, trailing: int) -> Tensor:
    """``[..., *trailing dims]`` -> ``[T, *trailing dims]`` contiguous (a view when possible)."""
    return x.reshape((-1,) + tuple(x.shape[x.dim() - trailing :])).contiguous()


def unflatten_tokens(t: Tensor, lead: torch.Size | tuple[int, ...]) -> Tensor:
    """``[T, *rest]`` -> ``[*lead, *rest]``."""
    return t.reshape(tuple(lead) + tuple(t.shape[1:]))
