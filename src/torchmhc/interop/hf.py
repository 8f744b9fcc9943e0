"""Hyper-connections for Hugging Face causal language models, added to a pretrained decoder
without changing what it computes; saved and reloaded with safetensors and config.json only.

Legend: ``B`` batch, ``T`` tokens, ``C`` hidden size, ``n`` streams, ``l`` sub-layer index.

::

    model = AutoModelForCausalLM.from_pretrained(...)           # Llama, Mistral, Qwen2, Qwen3, GPT-2
    add_hyper_connections(model, n=4, residual="mhc", freeze_base=True)
    ... train; model.generate(...) ...
    save_pretrained(model, path)                                  # safetensors + config.json, atomic
    model = from_pretrained(path)                                 # the converted model again

How a converted model runs. The model's own forward is untouched (embedding, masks, rotary
tables, KV cache, final norm, LM head); each decoder layer becomes a subclass of its own class
whose forward runs the layer's attention and MLP, each with its pre-norm, as the branches of two
:class:`~torchmhc.layers.HyperConnection` modules. Between layers the model's loop carries the
streams flattened, ``[B, T, n*C]``::

    h = embed(tokens)                                                  # [B, T, C]
    for i, layer in enumerate(layers):
        x = expand_streams(h, n) if i == 0 else h.unflatten(-1, (n, C))  # [B, T, n, C]
        u, ctx = layer.hc_attn.pre(x)                                  # [B, T, C]
        u, ctx = layer.hc_attn.post_pre(ctx, attn(attn_norm(u)), layer.hc_ffn)
        x = layer.hc_ffn.post(ctx, mlp(mlp_norm(u)))                   # [B, T, n, C]
        h = layer.hc_head(x) if i == last else x.flatten(-2)           # [B, T, C] | [B, T, n*C]
    logits = lm_head(norm(h))

The layers become instances of subclasses of their own classes (``HyperConnectedLlamaDecoderLayer``)
and keep their parameters' names (``model.layers.0.self_attn.q_proj.weight``); the new parameters are ``model.layers.{i}.hc_attn.{fn,base,scale}``, ``...hc_ffn...``
and ``model.layers.{L-1}.hc_head.{fn,base,scale}``. ``output_hidden_states`` therefore gives the
flattened streams ``[B, T, n*C]`` after every layer but the last.

Function-preserving start (:func:`preserving_init_`). With all n streams equal to the hidden
state ``h`` and ``fn = 0`` (every coefficient is then its bias's function, the same for every
token), a sub-layer's update is exactly the residual update when

- the pre-mix weights sum to 1: ``Σ_j H_pre[j]·x[j] = h``, the branch sees what it saw before;
- every row of ``H_res`` sums to 1: ``Σ_j H_res[i, j]·x[j] = h``;
- ``H_post = 1``: stream i becomes ``h + F(h)``, the original residual stream;

so all streams stay equal to the original model's hidden state, layer after layer, and the head,
whose weights also sum to 1, hands the final norm exactly that state: the logits are the original
model's, for any input, cache or mask. The biases that do it (DeepSeek-V4 numerics: ``H_pre =
σ(b) + eps``, ``H_post = post_scale·σ(b)``, head weights ``σ(b) + eps``):

- ``H_pre``: sub-layer l reads stream ``l mod n`` with weight ``1 − (n−1)·q`` and every other stream
  with ``q = 1 − IDENTITY_WEIGHT`` (0.01): the library's ``"onehot"`` start, scaled to sum to 1;
  ``b = logit(weight − eps)``;
- ``H_post``: ``b = logit(ρ^(l+1)/post_scale)`` for sub-layer l, ρ the row sum of its H_res
  (exactly 1 where the manifold's start is exact: ``b = 0`` for the default post_scale 2);
- ``H_res``: the manifold's near-identity start (Sinkhorn: ``IDENTITY_WEIGHT`` on the diagonal);
- head: weight ``1/n`` per stream, ``b = logit(1/n − eps)``.

Why asymmetric: if every stream had the same parameters, the converted model would be equivariant
under permutations of the streams, gradient descent would keep it so, and the streams would stay
copies of one another forever (an n-times dearer residual). With sub-layers reading different
streams, the streams' gradients differ from the first step on. ``fn = 0`` does not stop learning:
its gradient is ``α·∂L/∂h̃ ⊗ x̂`` with the gates α at ``alpha_init`` (0.01); the gates' own
gradient, ``∂L/∂h̃·m``, is zero until ``fn`` has moved (one step).

Exactness: the sums of pre and head weights are 1 to fp32 rounding; H_res's rows are exactly 1
for the manifolds whose identity start is exact (identity, orthostochastic, spectral,
unconstrained; mHC-lite to rounding). Sinkhorn (``mhc``) with DeepSeek's ``eps`` = 1e-6 ends its
rows at ``ρ = S/(S + eps)``, 1 − 1e-6: each sub-layer keeps ``ρ·h`` of the carried state. Left
alone, that changes the logits by about 3e-7 (relative) per sub-layer, 2.3e-5 for a 32-layer
Llama. ``H_post = ρ^(l+1)`` scales sub-layer l's branch output to match, so that every stream is
``ρ^(l+1)`` times the original hidden state: a uniform scale, which each branch's pre-norm and the
final norm divide out (up to their own small epsilon). Measured: 9.5e-7 with 32 layers.
``eps=0`` makes the start exact in fp64 (equal logits), at the cost of the fused coefficient
kernels, which implement ``eps > 0``. HC (``residual="hc"``) needs nothing: its own start (θ = 0,
one-hot H_pre, H_res = I, H_post = 1) already preserves the function. docs/hf.md
has the measurements.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..layers import HyperConnection, StreamHead, expand_streams
from ..manifolds import IDENTITY_WEIGHT
from ..residuals import get_residual

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CONFIG_KEY",
    "add_hyper_connections",
    "from_pretrained",
    "hyper_connection_parameters",
    "preserving_init_",
    "save_pretrained",
]

#: The key of ``config.json`` (and attribute of the model's config) holding the conversion settings.
CONFIG_KEY = "torchmhc"
_FORMAT = 1
#: ``**options`` of :func:`add_hyper_connections`, passed to every :class:`HyperConnection`
#: (the head takes ``eps``, ``rms_eps`` and ``alpha_init``).
_OPTIONS = ("iters", "eps", "rms_eps", "post_scale", "alpha_init")
_HEAD_OPTIONS = ("eps", "rms_eps", "alpha_init")


@dataclass(frozen=True)
class _Family:
    """Where a family keeps its decoder layers and what a layer's two branches are made of."""

    layers: str  # attribute path from the causal LM to the nn.ModuleList of decoder layers
    attn_norm: str
    attn: str  # called as attn(attn_norm(u), **the layer's keyword arguments) -> (output, weights)
    mlp_norm: str
    mlp: str
    # keyword arguments the layer takes but its attention does not (GPT-2's cross-attention inputs)
    layer_only: tuple[str, ...] = ()


_LLAMA_LIKE = _Family("model.layers", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_FAMILIES: dict[str, _Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": _Family("transformer.h", "ln_1", "attn", "ln_2", "mlp", ("encoder_hidden_states", "encoder_attention_mask")),
}
#: ``config.model_type`` values :func:`add_hyper_connections` converts.
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


class _HyperConnectedLayer:
    """The forward of a converted decoder layer; mixed in front of the layer's own class.

    Instance attributes set by :func:`add_hyper_connections`: ``hc_attn``, ``hc_ffn``
    (HyperConnection), ``hc_head`` (StreamHead on the last layer when n > 1, else None),
    ``hc_first`` and ``hc_last`` (bool).
    """

    _hc_family: ClassVar[_Family]
    _hc_arg_names: ClassVar[tuple[str, ...]]  # the layer's positional parameters after hidden_states

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``hidden_states``: ``[B, T, C]`` (first layer) or the streams ``[B, T, n*C]``; the rest as
        the layer's own forward takes them. Returns ``[B, T, n*C]``, or ``[B, T, C]`` from the last layer."""
        family = self._hc_family
        if len(args) > len(self._hc_arg_names):
            raise TypeError(f"{type(self).__name__}.forward takes at most {len(self._hc_arg_names) + 1} positional arguments")
        kwargs.update(zip(self._hc_arg_names, args))
        for name in family.layer_only:
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"{type(self).__name__} with hyper-connections does not support {name}")
        n, c = self.hc_attn.num_streams, self.hc_attn.dim
        x = expand_streams(hidden_states, n) if self.hc_first else hidden_states.unflatten(-1, (n, c))  # [B, T, n, C]
        u, ctx = self.hc_attn.pre(x)  # [B, T, C]
        attn_out = getattr(self, family.attn)(getattr(self, family.attn_norm)(u), **kwargs)[0]
        # the attention's post-res and the MLP's coefficients + pre-mix in one pass over the streams
        u, ctx = self.hc_attn.post_pre(ctx, attn_out, self.hc_ffn)
        x = self.hc_ffn.post(ctx, getattr(self, family.mlp)(getattr(self, family.mlp_norm)(u)))  # [B, T, n, C]
        if not self.hc_last:
            return x.flatten(-2)  # [B, T, n*C]: the model's loop passes one tensor of this rank
        return self.hc_head(x) if self.hc_head is not None else x[..., 0, :]  # [B, T, C]


@functools.cache
def _hyper_connected_class(base: type, family: _Family) -> type:
    """``HyperConnected<Base>``: the layer class with :class:`_HyperConnectedLayer`'s forward.

    A subclass, not a wrapper: the layer keeps its attributes, its parameters' names and its
    isinstance checks (transformers finds the layers it records ``output_hidden_states`` from, and
    the gradient-checkpointing layers, by class; FSDP2's ``fully_shard`` subclasses layers alike).
    """
    parameters = list(inspect.signature(base.forward).parameters.values())[2:]  # after self, hidden_states
    positional = tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return type(
        f"HyperConnected{base.__name__}",
        (_HyperConnectedLayer, base),
        {"__module__": __name__, "_hc_family": family, "_hc_arg_names": positional},
    )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@torch.no_grad()
def preserving_init_(hc: HyperConnection | StreamHead) -> None:
    """Sets ``hc``'s parameters, in place, to the function-preserving start (module docstring):
    with equal streams, a HyperConnection computes the residual update ``h + F(h)`` on every stream
    and a StreamHead returns ``h``.

    HC (``residual="hc"``) and the plain residual are left as they are: their own start preserves
    the function already.
    """
    if isinstance(hc, StreamHead):
        hc.fn.zero_()
        hc.base.fill_(_logit(1 / hc.num_streams - hc.eps))
        return
    if not isinstance(hc, HyperConnection):
        raise TypeError(f"hc must be a HyperConnection or a StreamHead, got {type(hc).__name__}")
    if hc.manifold is None:  # "residual" (no parameters) or "hc" (θ = 0: H = the static start)
        return
    n, eps = hc.num_streams, hc.eps
    q = 1 - IDENTITY_WEIGHT if n > 1 else 0.0
    pre = torch.full((n,), q, dtype=torch.float64)  # in fp64: exact starts for fp64 models
    pre[hc.layer_index % n] = 1 - (n - 1) * q
    if (pre <= eps).any():
        raise ValueError(f"eps must be below the smallest pre-mix weight {float(pre.min())} for a function-preserving start, got {eps}")
    pre = torch.logit(pre - eps)
    res = hc.manifold.init_logits(n, "identity").double()
    # H_res's rows sum to ρ (1 - ~1e-6 for Sinkhorn with eps > 0; 1 for the exact manifolds): the
    # carried state shrinks by ρ per sub-layer. H_post = ρ^(l+1) scales sub-layer l's branch output
    # to match, so the streams are ρ^(l+1)·(the original hidden state): a uniform scale, which every
    # pre-norm branch and the final norm divide out (module docstring).
    hc.base.copy_(torch.cat([pre, torch.zeros(n, dtype=torch.float64), res]))
    hc.fn.zero_()
    target = _row_sum(hc) ** (hc.layer_index + 1) / hc.post_scale  # σ(b_post)
    if not 0 < target < 1:
        raise ValueError(f"post_scale must be above 1 for a function-preserving start (H_post = post_scale·σ), got {hc.post_scale}")
    hc.base[n : 2 * n] = _logit(target)


def _row_sum(hc: HyperConnection) -> float:
    """The mean row sum of ``hc``'s H_res with ``fn = 0`` (the same for every token), in fp64."""
    probe = copy.deepcopy(hc).double()
    _, ctx = probe.pre(torch.ones(1, hc.num_streams, hc.dim, dtype=torch.float64, device=hc.fn.device))
    return float(ctx.h_res.sum(-1).mean())


def _family(model: nn.Module) -> _Family:
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:  # pragma: no cover - the tests need transformers
        raise ImportError("torchmhc.interop.hf needs transformers: pip install 'torchmhc[hf]'") from exc
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(
            f"add_hyper_connections supports the decoder families {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(config.model_type); got {model_type!r} ({type(model).__name__})"
        )
    if model_type == "gpt2" and getattr(model.config, "add_cross_attention", False):
        raise ValueError("add_hyper_connections supports GPT-2 without cross-attention (config.add_cross_attention=False)")
    family = _FAMILIES[model_type]
    if not hasattr(model, family.layers.split(".")[0]):
        raise ValueError(
            f"model must be a causal LM of its family with its decoder at model.{family.layers} "
            f"(e.g. {model_type}'s *ForCausalLM); got {type(model).__name__}"
        )
    return family


def _layers(model: nn.Module, family: _Family) -> nn.ModuleList:
    return functools.reduce(getattr, family.layers.split("."), model)


def add_hyper_connections(
    model: PreTrainedModel,
    n: int = 4,
    residual: str = "mhc",
    *,
    freeze_base: bool = False,
    **options: Any,
) -> PreTrainedModel:
    """Wraps every decoder layer's attention and MLP residual of ``model`` in a hyper-connection,
    in place, starting where the model's function is unchanged (see the module docstring).

    Args:
        model: a transformers causal LM whose ``config.model_type`` is one of
            :data:`SUPPORTED_MODEL_TYPES` (``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``GPT2LMHeadModel``), any dtype and device.
        n: number of streams. ``residual="residual"`` always has one.
        residual: a ``torchmhc.residuals`` kind (``"mhc"``, ``"hc"``, ``"mhc-lite"``, ...).
        freeze_base: make the new parameters the only ones with ``requires_grad``.
        **options: ``iters``, ``eps``, ``rms_eps``, ``post_scale``, ``alpha_init`` of
            :class:`HyperConnection` (the head takes ``eps``, ``rms_eps``, ``alpha_init``);
            DeepSeek-V4's values by default. JSON values: they are saved in the config.

    The new parameters are fp32 (fp64 in an fp64 model) on the device of each layer: coefficients
    are fp32 math whatever the model's dtype, so keep them fp32 when casting the model. Their settings go to ``model.config.torchmhc``, which ``save_pretrained``
    writes to config.json and :func:`from_pretrained` reads back.

    Returns:
        ``model``, converted.

    Raises:
        ValueError: an unsupported model family, an already converted model, a bad option.
        TypeError: ``model`` is not a transformers model; an unknown option.
    """
    family = _family(model)
    if getattr(model.config, CONFIG_KEY, None) is not None:
        raise ValueError(
            f"model already has hyper-connections (config.{CONFIG_KEY} = {getattr(model.config, CONFIG_KEY)}); "
            f"a saved converted model is loaded with torchmhc.interop.hf.from_pretrained"
        )
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for add_hyper_connections; options: {', '.join(_OPTIONS)}")
    if not isinstance(freeze_base, bool):
        raise TypeError(f"freeze_base must be a bool, got {type(freeze_base).__name__}")
    kind = get_residual(residual)
    layers = _layers(model, family)
    if any(isinstance(layer, _HyperConnectedLayer) for layer in layers):
        raise ValueError("model already has hyper-connections (its decoder layers are converted)")
    dim = model.config.hidden_size
    head_options = {k: v for k, v in options.items() if k in _HEAD_OPTIONS}
    # Built first, attached after: a bad option fails before the model is touched.
    built = []
    for i, layer in enumerate(layers):
        like = next(layer.parameters())
        # fp32 coefficient parameters whatever the model's dtype; fp64 for an fp64 model (exact checks)
        to = {"device": like.device, "dtype": torch.float64 if like.dtype == torch.float64 else torch.float32}
        hcs = [HyperConnection(dim, n, kind.name, layer_index=2 * i + j, **options).to(**to) for j in (0, 1)]
        last = i == len(layers) - 1
        num_streams = hcs[0].num_streams
        head = StreamHead(dim, num_streams, **head_options).to(**to) if last and num_streams > 1 else None
        for module in (*hcs, head):
            if module is not None:
                preserving_init_(module)
        built.append((hcs, head))
    if freeze_base:
        model.requires_grad_(False)
    for i, (layer, ((hc_attn, hc_ffn), head)) in enumerate(zip(layers, built)):
        layer.__class__ = _hyper_connected_class(type(layer), family)
        layer.hc_attn, layer.hc_ffn, layer.hc_head = hc_attn, hc_ffn, head
        layer.hc_first, layer.hc_last = i == 0, i == len(layers) - 1
    setattr(model.config, CONFIG_KEY, {"format": _FORMAT, "n": n, "residual": kind.name, "options": dict(options)})
    return model


def hyper_connection_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs the conversion added (hyper-connections and the stream head)."""
    return [
        (name, param)
        for prefix, module in model.named_modules()
        if isinstance(module, (HyperConnection, StreamHead))
        for name, param in ((f"{prefix}.{p}", q) for p, q in module.named_parameters())
    ]


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` at ERROR level for the duration of the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (one file, or the shards of its index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{str(path)!r} holds no model.safetensors (or its index): not a save_pretrained directory")
    return [single]


def save_pretrained(model: PreTrainedModel, path: str | Path, **kwargs: Any) -> Path:
    """``model.save_pretrained(path, **kwargs)`` that a crash cannot leave half-written: the files
    go to a temporary directory beside ``path``, which replaces ``path`` once complete. A save
    killed before that leaves ``path`` as it was (and a ``.<name>.tmp*`` directory to delete); the
    replacement itself is two renames (the old directory aside, the new one in), between which
    ``path`` is briefly absent and the old directory waits at ``.<name>.old*``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp.with_name(tmp.name.replace(".tmp", ".old", 1)) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def from_pretrained(path: str | Path, *, freeze_base: bool = False, **kwargs: Any) -> PreTrainedModel:
    """Loads a converted model saved with ``save_pretrained``: the base model through transformers'
    own ``AutoModelForCausalLM.from_pretrained(path, **kwargs)``, then the conversion its
    config.json records, then the hyper-connection weights from the same safetensors files.

    Loading is strict: every base weight and every hyper-connection weight must be in the files,
    and nothing else. No pickle is read (safetensors and JSON only).

    Args:
        path: a local directory written by ``model.save_pretrained``.
        freeze_base: as in :func:`add_hyper_connections`.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).

    Raises:
        ValueError: ``path`` is not a saved converted model, or its weights do not match.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a save_pretrained directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict) or settings.get("format") != _FORMAT:
        raise ValueError(
            f"{str(path)!r} was not saved from a model converted by add_hyper_connections "
            f"(config.json has no {CONFIG_KEY!r} settings of format {_FORMAT}, got {settings!r})"
        )
    setattr(config, CONFIG_KEY, None)  # the base model first; the conversion sets it again
    with _quiet("transformers.modeling_utils"):  # its report would list our weights as unexpected; checked below
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    add_hyper_connections(model, settings["n"], settings["residual"], freeze_base=freeze_base, **settings["options"])
    params = dict(hyper_connection_parameters(model))
    # transformers loaded the base weights and left ours as unexpected: they must be exactly ours
    missing = sorted(info["missing_keys"]) + sorted(set(params) - set(info["unexpected_keys"]))
    unknown = sorted(set(info["unexpected_keys"]) - set(params))
    if missing or unknown or info["mismatched_keys"]:
        raise ValueError(
            f"{str(path)!r} does not match its converted model: missing {missing[:3]}, unknown {unknown[:3]}, "
            f"of another shape {list(info['mismatched_keys'])[:3]}"
        )
    found: set[str] = set()
    with torch.no_grad():
        for file in _checkpoint_files(path):
            with safe_open(str(file), framework="pt") as f:
                for key in params.keys() & set(f.keys()):
                    value = f.get_tensor(key)
                    if value.shape != params[key].shape:
                        raise ValueError(f"{key} has shape {list(value.shape)} in {file.name}, the model expects {list(params[key].shape)}")
                    params[key].copy_(value)
                    found.add(key)
    if found != set(params):
        raise ValueError(f"{str(path)!r} lacks hyper-connection weights {sorted(set(params) - found)[:3]}")
    return model
