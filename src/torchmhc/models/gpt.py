"""A GPT-style decoder whose every sub-layer sits inside a hyper-connection.

Notable features:
- pre-norm sub-layers (RMSNorm inside the branch), rotary position embeddings, causal attention
  through ``scaled_dot_product_attention``, SwiGLU feed-forward or a DeepSeek-V3-style MoE;
- attention and FFN are separate sub-layers, each wrapped by its own
  ``torchmhc.HyperConnection`` (2 per block, ``layer_index`` 0 .. 2L-1), so ``residual=`` switches
  the whole model between a plain residual, HC, mHC and the other manifolds;
- the embedding enters the ``n`` residual streams by ``expand_streams`` (copied, docs/math.md §7) and
  leaves through ``StreamHead``; the plain residual uses a single stream.

Legend: B batch, T sequence, V vocab, C model dim (one stream), n streams, h heads, d head dim.
"""

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchmhc.config import ModelConfig
from torchmhc.layers import HyperConnection, HyperConnectionContext, StreamHead, expand_streams
from torchmhc.models.moe import MoE, SwiGLU
from torchmhc.recompute import run_sublayers

__all__ = ["GPT", "Block", "Attention", "embed_streams", "run_blocks", "streams_to_logits", "sublayers_of"]


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables of rotary embeddings, each ``[max_seq_len, head_dim / 2]`` fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of ``x [..., d]`` by position: ``cos`` and
    ``sin`` broadcast against ``x``'s ``[..., d/2]`` (e.g. ``[T, 1, d/2]`` for ``x [B, T, heads, d]``)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [..., d/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


@contextlib.contextmanager
def isolated_rng(offset: int) -> Iterator[None]:
    """Run a block of parameter initialization on its own CPU random stream.

    Hyper-connection parameters exist in some variants and not in others; drawing them from a
    separate stream (seeded from the run seed + ``offset``) leaves every other weight identical
    across ``residual=`` variants with the same seed, so a comparison changes only the connection.
    """
    seed = torch.initial_seed() + 1_000_003 * (offset + 1)
    # Models built under ``with torch.device("cuda"):`` draw from the CUDA generator: fork that too.
    device = torch.get_default_device()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(seed % 2**63)
        yield


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE: ``[B, T, C] -> [B, T, C]`` (no norm inside)."""

    def __init__(self, cfg: ModelConfig, *, out_std: float) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        nn.init.normal_(self.wqkv.weight, std=0.02)
        nn.init.normal_(self.wo.weight, std=out_std)
        cos, sin = rope_tables(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Derived from the config: not saved in checkpoints.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.num_heads
        qkv = self.wqkv(x).view(B, T, 3 * h, self.head_dim)  # [B, T, 3h, d]: q heads, k heads, v heads
        # q and k rotated in one pass (half the elementwise ops of two calls; same values)
        qk = apply_rope(qkv[:, :, : 2 * h], self.cos[:T, None], self.sin[:T, None])  # [B, T, 2h, d]
        q, k = qk.transpose(1, 2).split(h, dim=1)  # [B, h, T, d] each
        v = qkv[:, :, 2 * h :].transpose(1, 2)  # [B, h, T, d]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, h, T, d]
        return self.wo(y.transpose(1, 2).reshape(B, T, C))  # [B, T, C]


class Block(nn.Module):
    """One transformer block = two sub-layers, each inside its own hyper-connection.

    ``x [B, T, n, C] -> [B, T, n, C]``; the branches see one mixed stream ``[B, T, C]``.
    """

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        n = cfg.effective_num_streams
        # GPT-2's depth scaling of the output projections keeps the residual sum's variance flat.
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        hc_kwargs = {"init": cfg.hc_init} if cfg.hc_init else {}
        with isolated_rng(2 * index):
            self.attn_hc = HyperConnection(cfg.dim, n, cfg.residual, layer_index=2 * index, **hc_kwargs)
        with isolated_rng(2 * index + 1):
            self.ffn_hc = HyperConnection(cfg.dim, n, cfg.residual, layer_index=2 * index + 1, **hc_kwargs)
        self.fuse_transition = cfg.fuse_transitions
        self.fuse_branch_norm = cfg.fuse_branch_norm
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.attn = Attention(cfg, out_std=out_std)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        if cfg.arch == "moe":
            self.ffn = MoE(
                cfg.dim,
                num_experts=cfg.num_experts,
                num_shared_experts=cfg.num_shared_experts,
                top_k=cfg.top_k,
                hidden=cfg.effective_expert_hidden,
                bias_rate=cfg.router_bias_rate,
                out_std=out_std,
            )
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.effective_ffn_hidden, out_std=out_std)

    def attn_branch(self, h: Tensor) -> Tensor:
        """Sub-layer F of the attention hyper-connection: ``[B, T, C] -> [B, T, C]``."""
        return self.attn(self.attn_norm(h))

    def ffn_branch(self, h: Tensor) -> Tensor:
        """Sub-layer F of the FFN hyper-connection: ``[B, T, C] -> [B, T, C]``."""
        return self.ffn(self.ffn_norm(h))

    def compile_branches(self, **compile_kwargs) -> None:
        """``torch.compile`` the two branches in place (for block recomputation, which calls the
        connections and the branches itself); the connections stay eager."""
        # Instance attributes shadow the methods, so Block.forward and GPT.sublayers use them.
        self.attn_branch = torch.compile(self.attn_branch, **compile_kwargs)
        self.ffn_branch = torch.compile(self.ffn_branch, **compile_kwargs)

    def forward(
        self, x: Tensor, ctx: HyperConnectionContext | None = None, next_block: "Block | None" = None
    ) -> Tensor | tuple[Tensor, HyperConnectionContext]:
        """Streams ``x [B, T, n, C]`` -> streams ``[B, T, n, C]``.

        With ``model.fuse_transitions`` the attention's post-res runs fused with the FFN's
        coefficients and pre-mix. Chained (``run_blocks``): ``x`` is the attention's layer input
        ``[B, T, C]`` and ``ctx`` its connection's context, made by the previous block's last
        transition, or, in the chain's first block, ``x`` is the streams and ``ctx`` None (the
        attention's pre then runs here, inside the block and its compiled graph); the FFN's
        post-res runs fused with ``next_block``'s attention coefficients and pre-mix, and the
        block returns that layer input and context, or the streams if there is no next block.
        With ``model.fuse_branch_norm`` too, the layer inputs that transitions make come out
        through the next branch's RMSNorm (``HyperConnection.post_pre``'s ``norm``), and the
        branches run without theirs: a chained ``x`` is then normalized already.
        """
        if self.fuse_transition or ctx is not None or next_block is not None:
            norms = self.fuse_branch_norm
            attn, ffn = (self.attn, self.ffn) if norms else (self.attn_branch, self.ffn_branch)
            if ctx is None:  # x: the streams
                x, ctx = self.attn_hc.pre(x)  # [B, T, C]
                x = self.attn_norm(x) if norms else x
            u, ctx = self.attn_hc.post_pre(ctx, attn(x), self.ffn_hc, self.ffn_norm if norms else None)
            if next_block is None:
                return self.ffn_hc.post(ctx, ffn(u))  # [B, T, n, C]
            following = (next_block.attn_hc, next_block.attn_norm if norms else None)
            return self.ffn_hc.post_pre(ctx, ffn(u), *following)  # ([B, T, C], context)
        x = self.attn_hc(x, self.attn_branch)  # [B, T, n, C]
        x = self.ffn_hc(x, self.ffn_branch)  # [B, T, n, C]
        return x


def sublayers_of(blocks: Iterable[Block]) -> list[tuple[HyperConnection, Callable[[Tensor], Tensor]]]:
    """The (hyper-connection, branch) pairs of ``blocks`` in order: what ``Block.forward`` runs."""
    return [pair for b in blocks for pair in ((b.attn_hc, b.attn_branch), (b.ffn_hc, b.ffn_branch))]


def embed_streams(tok_emb: nn.Embedding, idx: Tensor, num_streams: int) -> Tensor:
    """Token ids ``[B, T]`` -> streams ``[B, T, n, C]`` in the activation dtype (the network's entry)."""
    h = tok_emb(idx)  # [B, T, C] fp32 (embedding lookups are not autocast)
    if torch.is_autocast_enabled(h.device.type):
        # The streams live in the activation dtype (docs/math.md §1), for every residual variant alike:
        # without this cast they would be fp32 under autocast, doubling the stream traffic.
        h = h.to(torch.get_autocast_dtype(h.device.type))
    return expand_streams(h, num_streams)  # [B, T, n, C]


def run_blocks(blocks: Iterable[Block], x: Tensor, cfg: ModelConfig) -> Tensor:
    """Streams ``[B, T, n, C]`` through ``blocks`` in order -> ``[B, T, n, C]``.

    With ``cfg.recompute`` the blocks' sub-layers run under block recomputation, whose blocks
    start again at the first sub-layer given here: a pipeline stage passes its own blocks, so a
    recomputation block never crosses a stage edge, and the default length L_r* is computed from
    the stage's own number of sub-layers.
    """
    if cfg.recompute:  # same values and gradients, fewer saved streams (torchmhc.recompute)
        return run_sublayers(x, sublayers_of(blocks), block_length=cfg.recompute_block_length or None)
    blocks = list(blocks)
    if not cfg.fuse_transitions or len(blocks) < 2:
        for block in blocks:
            x = block(x)  # [B, T, n, C]
        return x
    # Every transition fused, across blocks too: each block ends with its FFN's post-res fused
    # with the next block's attention coefficients and pre-mix (Block.forward, chained). The first
    # block also runs the chain's first pre, inside its compiled graph: run eager before it, the
    # pre's launches from Python left the GPU idle (gpu-moe-3b on an H100, e2e.py --profile: gaps
    # of 0.7 ms a step around them and the first block's graph)
    u, ctx = blocks[0](x, None, blocks[1])  # [B, T, C]
    for block, following in zip(blocks[1:-1], blocks[2:]):
        u, ctx = block(u, ctx, following)
    return blocks[-1](u, ctx)  # [B, T, n, C]


def streams_to_logits(stream_head: StreamHead | None, norm: nn.Module, lm_head: nn.Linear, x: Tensor) -> Tensor:
    """Streams ``[B, T, n, C]`` -> logits ``[B, T, V]`` (the network's exit); without a stream
    head (one stream) stream 0 is the hidden state."""
    h = stream_head(x) if stream_head is not None else x[..., 0, :]  # [B, T, C]
    return lm_head(norm(h))  # [B, T, V]


class GPT(nn.Module):
    """Decoder-only language model: token ids ``[B, T]`` -> logits ``[B, T, V]``.

    ``cfg.residual`` and ``cfg.num_streams`` choose the residual connection (see
    :class:`torchmhc.config.ModelConfig`); ``cfg.arch = "moe"`` swaps the FFNs for MoE layers.
    """

    def __init__(self, cfg: ModelConfig, *, place_block: Callable[[int, Block], Block] | None = None) -> None:
        """Build the model from the current random state: the embedding, the blocks in order, the
        stream head (on a stream of its own, ``isolated_rng``), the final norm and the LM head.

        ``place_block(index, block)``, if given, receives each block right after it is built (its
        random draws taken) and returns what the model keeps in its place: a laid-out build
        (``torchmhc.distributed.parallel_model``) moves it to the meta device or shards it there,
        so that no process holds every block at once while the weights stay those of a plain build.
        """
        super().__init__()
        self.cfg = cfg
        self.num_streams = cfg.effective_num_streams
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        place_block = place_block or (lambda index, block: block)
        self.blocks = nn.ModuleList(place_block(i, Block(cfg, i)) for i in range(cfg.num_layers))
        # With one stream there is nothing to merge; the head is the identity on stream 0.
        with isolated_rng(2 * cfg.num_layers):
            self.stream_head = StreamHead(cfg.dim, self.num_streams) if self.num_streams > 1 else None
        self.norm = nn.RMSNorm(cfg.dim, eps=1e-6)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        """``idx`` int64 ``[B, T]`` (T <= max_seq_len) -> logits ``[B, T, V]`` (fp32 on CPU)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape [B, T], got {list(idx.shape)}.")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"idx has sequence length {idx.shape[1]} > model max_seq_len {self.cfg.max_seq_len}."
            )
        x = embed_streams(self.tok_emb, idx, self.num_streams)  # [B, T, n, C]
        x = run_blocks(self.blocks, x, self.cfg)  # [B, T, n, C]
        return streams_to_logits(self.stream_head, self.norm, self.lm_head, x)  # [B, T, V]

    def sublayers(self) -> list[tuple[HyperConnection, Callable[[Tensor], Tensor]]]:
        """The 2L (hyper-connection, branch) pairs in order: what ``Block.forward`` runs."""
        return sublayers_of(self.blocks)

    def hyper_connections(self) -> list[HyperConnection]:
        """The 2L hyper-connections in sub-layer order (attention, FFN, attention, ...)."""
        return [hc for block in self.blocks for hc in (block.attn_hc, block.ffn_hc)]

    def update_router_bias(self, keep: torch.Tensor | float = 1.0) -> None:
        """Balance MoE routing once per optimizer step (no-op for the dense model); ``keep`` as
        :meth:`MoE.update_router_bias` takes it."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.update_router_bias(keep)

    def num_params(self) -> int:
        """Number of parameters (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters())
