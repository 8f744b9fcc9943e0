"""A small DeepSeek-V3-style mixture-of-experts feed-forward sub-layer.

Notable features (DeepSeek-V3 report, Sec. 2.1.2):
- shared experts that see every token, plus ``E`` routed experts of which each token uses ``k``;
- sigmoid router scores; the top-k choice uses ``score + bias`` but the gate weights use the
  scores alone, renormalized over the chosen experts;
- auxiliary-loss-free load balancing: after every optimizer step the bias of an over-loaded
  expert goes down by ``u`` and that of an under-loaded one up by ``u``
  (:meth:`MoE.update_router_bias`); the bias is a buffer, never touched by the gradient;
- routed experts run as grouped matrix products over tokens sorted by expert:
  ``torch._grouped_mm`` on CUDA where PyTorch has it, a padded batched ``bmm`` elsewhere.

Legend: N tokens, C model dim, E routed experts, k experts per token, H expert hidden size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwiGLU", "MoE", "grouped_matmul"]


class SwiGLU(nn.Module):
    """``w_down(silu(x W_gate) * (x W_up))``: ``[..., C] -> [..., C]`` (no norm inside)."""

    def __init__(self, dim: int, hidden: int, *, out_std: float = 0.02) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.w_gate_up.weight, std=0.02)
        nn.init.normal_(self.w_down.weight, std=out_std)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)  # [..., H] each
        return self.w_down(F.silu(gate) * up)  # [..., C]


def grouped_matmul(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Row groups of ``x`` times their own matrix: ``out[rows of group e] = x[rows] @ weight[e]``.

    Args:
        x: ``[M, K]``, rows sorted by group (group 0's ``counts[0]`` rows first, ...).
        weight: ``[E, K, N]``, one matrix per group.
        counts: ``[E]`` int64, rows per group; sums to M.

    Returns:
        ``[M, N]`` in ``x``'s dtype (the autocast dtype inside an autocast region).
    """
    if torch.is_autocast_enabled(x.device.type):
        # Autocast does not reach custom index/grouped ops: cast the operands as it would.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight = weight.to(x.dtype)  # parameters stay fp32
    # PyTorch's grouped GEMM on CUDA takes bf16 operands (Hopper and newer); fp32 falls through.
    if x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offsets = counts.cumsum(0).to(torch.int32)  # end row of each group
        return torch._grouped_mm(x, weight, offs=offsets)
    # Batched fallback: scatter each group into a zero-padded [E, max_count, K] block, one bmm.
    num_groups = weight.shape[0]
    group = torch.repeat_interleave(torch.arange(num_groups, device=x.device), counts)  # [M]
    starts = counts.cumsum(0) - counts  # [E] first row of each group
    slot = torch.arange(x.shape[0], device=x.device) - starts[group]  # [M] row within its group
    capacity = int(counts.max()) if x.shape[0] else 0
    padded = x.new_zeros(num_groups, capacity, x.shape[1])  # [E, max_count, K]
    padded[group, slot] = x
    return torch.bmm(padded, weight)[group, slot]  # [M, N]


class MoE(nn.Module):
    """DeepSeek-V3-style MoE FFN: ``[..., C] -> [..., C]`` (the caller applies the pre-norm)."""

    def __init__(
        self,
        dim: int,
        *,
        num_experts: int,
        num_shared_experts: int,
        top_k: int,
        hidden: int,
        bias_rate: float,
        out_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.bias_rate = bias_rate
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        # Routed experts' weights stacked on a leading expert axis for the grouped products.
        self.w_gate_up = nn.Parameter(torch.randn(num_experts, dim, 2 * hidden) * 0.02)  # [E, C, 2H]
        self.w_down = nn.Parameter(torch.randn(num_experts, hidden, dim) * out_std)  # [E, H, C]
        self.shared = (
            SwiGLU(dim, num_shared_experts * hidden, out_std=out_std) if num_shared_experts else None
        )
        # The balancing bias is model state (saved in checkpoints) but not a parameter.
        self.register_buffer("router_bias", torch.zeros(num_experts))
        # Tokens routed to each expert since the last bias update (training only).
        self.register_buffer("expert_load", torch.zeros(num_experts), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        if torch.is_autocast_enabled(x.device.type):
            # The token copies below are made in the autocast dtype (half the bytes of fp32).
            x = x.to(torch.get_autocast_dtype(x.device.type))
        scores = torch.sigmoid(self.router(x).float())  # [N, E] fp32
        # The bias steers which experts are chosen, not how much they contribute.
        _, expert = torch.topk(scores + self.router_bias, self.top_k, dim=-1)  # [N, k]
        gate = scores.gather(-1, expert)  # [N, k]
        gate = gate / gate.sum(-1, keepdim=True)
        flat = expert.flatten()  # [N*k]
        # Rows per expert, counted on the device: torch.bincount would wait for the GPU (it sizes
        # its output from the data), and neither its shape nor the sync suits torch.compile.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
        if self.training:
            self.expert_load += counts

        # Sort the N*k (token, expert) assignments by expert so each expert's rows are contiguous.
        order = flat.argsort(stable=True)  # [N*k]
        token = order // self.top_k  # [N*k] token of each sorted assignment
        h = grouped_matmul(x[token], self.w_gate_up, counts)  # [N*k, 2H]
        g, u = h.chunk(2, dim=-1)
        y = grouped_matmul(F.silu(g) * u, self.w_down, counts)  # [N*k, C], sorted by expert
        # Back to (token, choice) order, then each token's k rows weighted by its gates in one
        # batched product: no atomics (index_add_ would use them), deterministic.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        y = y[inverse].view(-1, self.top_k, shape[-1])  # [N, k, C]
        out = torch.bmm(gate.to(y.dtype).unsqueeze(1), y).squeeze(1)  # [N, C]
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    @torch.no_grad()
    def update_router_bias(self, keep: torch.Tensor | float = 1.0) -> None:
        """Auxiliary-loss-free balancing step: ``b_e += keep * u * sign(mean load - load_e)``; resets
        the loads.

        Args:
            keep: 1 applies the step, 0 discards the counted loads (a step whose update was left
                out); a float or a 0-dim tensor on the bias's device, so that the choice needs no
                host sync. With no load counted (every entry 0) the sign is 0 and the bias stays.
        """
        self.router_bias += keep * self.bias_rate * torch.sign(self.expert_load.mean() - self.expert_load)
        self.expert_load.zero_()
