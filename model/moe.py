"""Sparse mixture of SwiGLU experts with top-k routing (Mixtral) and its load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels
from model.config import ModelConfig


class SparseMoE(nn.Module):
    """Each token goes to its top-k experts by router softmax; the k weights are renormalised.

    Expert weights are stacked: gate_up_proj [experts, 2 * intermediate, hidden] and
    down_proj [experts, hidden, intermediate].
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * config.intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, config.intermediate_size))
        self.kernels_mode = config.kernels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the output and the router logits [tokens, experts]."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        router_logits = self.router(tokens)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_weights, top_experts = probs.topk(self.top_k, dim=-1)
        top_weights = (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(x.dtype)

        out = torch.zeros_like(tokens)
        flat_experts = top_experts.flatten()
        order = flat_experts.argsort(stable=True)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        slot_weights = top_weights.flatten()
        for expert, rows in enumerate(order.split(counts)):
            if rows.numel() == 0:
                continue
            token_idx = rows // self.top_k
            gate, up = F.linear(tokens[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(kernels.swiglu(gate, up, self.kernels_mode), self.down_proj[expert])
            out.index_add_(0, token_idx, expert_out * slot_weights[rows, None])
        return out.reshape(shape), router_logits


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers: num_experts * sum_e f_e * P_e,
    where f_e is the fraction of (token, slot) routings to expert e (summed over the top-k slots)
    and P_e the mean router probability of e. Equals top_k under perfectly balanced routing.
    `token_mask` [tokens] excludes padding."""
    num_experts = router_logits[0].shape[-1]
    logits = torch.cat(router_logits).float()
    probs = F.softmax(logits, dim=-1)
    routed = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
    if token_mask is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = token_mask.float().repeat(len(router_logits))
    total = weights.sum()
    fraction_routed = (routed * weights[:, None]).sum(0) / total
    mean_prob = (probs * weights[:, None]).sum(0) / total
    return num_experts * torch.dot(fraction_routed, mean_prob)
