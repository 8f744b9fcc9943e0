"""DeepSeek-V4 checkpoints <-> torchmhc modules.

torchmhc's mHC parameters use V4's layout (``fn [n²+2n, n·C]`` rows [pre | post | res] with the
res rows in ``comb`` order, ``base [n²+2n]``, ``scale [3]``; head ``fn [n, n·C]``, ``base [n]``,
``scale [1]``), so conversion is renaming plus checks. Names per block ``i`` in DeepSeek's released
checkpoints (``names="deepseek"``) and in transformers' ``DeepseekV4Model`` (``names="transformers"``;
its ``DeepseekV4ForCausalLM`` adds the prefix ``model.``)::

    deepseek                  transformers
    layers.{i}.hc_attn_fn     layers.{i}.attn_hc.fn       (and _base / .base, _scale / .scale)
    layers.{i}.hc_ffn_fn      layers.{i}.ffn_hc.fn
    hc_head_fn                hc_head.hc_fn               (hc_head.hc_base, hc_head.hc_scale)

V4's numerics (Sinkhorn iters 20, eps 1e-6, RMS eps 1e-6, post scale 2) are the modules' defaults;
transformers' config calls them ``hc_sinkhorn_iters``, ``hc_eps`` and ``rms_norm_eps``.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from ..layers import HyperConnection, StreamHead

__all__ = ["load_deepseek_v4_state", "export_deepseek_v4_state"]

_PARAMS = ("fn", "base", "scale")
Names = Literal["deepseek", "transformers"]
#: The name of block i's parameter p of the "attn" or "ffn" connection, and of the head's, per naming.
_NAMES = {
    "deepseek": ("layers.{i}.hc_{kind}_{p}", "hc_head_{p}"),
    "transformers": ("layers.{i}.{kind}_hc.{p}", "hc_head.hc_{p}"),
}


def _key_map(
    attn: Sequence[HyperConnection], ffn: Sequence[HyperConnection], head: StreamHead | None, prefix: str, names: Names
) -> dict[str, tuple[torch.nn.Module, str]]:
    if names not in _NAMES:
        raise ValueError(f"names must be one of {list(_NAMES)}, got {names!r}")
    block_name, head_name = _NAMES[names]
    if len(attn) != len(ffn):
        raise ValueError(f"attn and ffn must list one HyperConnection per block, got {len(attn)} and {len(ffn)}")
    keys: dict[str, tuple[torch.nn.Module, str]] = {}
    for i, (a, f) in enumerate(zip(attn, ffn)):
        for kind, module in (("attn", a), ("ffn", f)):
            if not isinstance(module, HyperConnection) or module.kind.name != "mhc":
                raise ValueError(f"{kind}[{i}] must be a HyperConnection with residual='mhc' (V4 uses Sinkhorn mHC)")
            for p in _PARAMS:
                keys[prefix + block_name.format(i=i, kind=kind, p=p)] = (module, p)
    if head is not None:
        for p in _PARAMS:
            keys[prefix + head_name.format(p=p)] = (head, p)
    return keys


@torch.no_grad()
def load_deepseek_v4_state(
    state_dict: Mapping[str, Tensor],
    *,
    attn: Sequence[HyperConnection],
    ffn: Sequence[HyperConnection],
    head: StreamHead | None = None,
    prefix: str = "",
    names: Names = "deepseek",
) -> None:
    """Copies V4's hyper-connection weights into torchmhc modules, in place.

    Args:
        state_dict: a V4 state dict (or the part of it holding ``hc_*`` tensors); other keys are ignored.
        attn, ffn: block i's attention and FFN hyper-connections (``residual="mhc"``), in block order.
        head: the network's :class:`StreamHead` (V4's ``hc_head_*``), if any.
        prefix: prepended to every V4 name (e.g. ``"mtp.0."``; ``"model."`` for the state dict of
            transformers' ``DeepseekV4ForCausalLM``).
        names: ``"deepseek"`` (the released checkpoints) or ``"transformers"`` (``DeepseekV4Model``).

    Raises:
        KeyError: names that the modules need are missing from ``state_dict``.
        ValueError: a tensor's shape does not match the module (wrong n or C).
    """
    keys = _key_map(attn, ffn, head, prefix, names)
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise KeyError(f"DeepSeek-V4 state dict lacks {len(missing)} hyper-connection tensors, e.g. {missing[:3]}")
    for key, (module, name) in keys.items():
        param: Tensor = getattr(module, name)
        value = state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key} has shape {list(value.shape)}, the module expects {list(param.shape)}")
        param.copy_(value.to(param.dtype))


def export_deepseek_v4_state(
    *,
    attn: Sequence[HyperConnection],
    ffn: Sequence[HyperConnection],
    head: StreamHead | None = None,
    prefix: str = "",
    names: Names = "deepseek",
) -> dict[str, Tensor]:
    """The inverse of :func:`load_deepseek_v4_state`: V4-named fp32 tensors (detached copies)."""
    keys = _key_map(attn, ffn, head, prefix, names)
    return {key: getattr(module, name).detach().float().clone() for key, (module, name) in keys.items()}
