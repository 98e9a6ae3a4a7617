"""The MoE layer: x -> Router -> Routing -> dispatch -> Experts -> combine -> y.

``residual=True`` is the paper's Residual-MoE (§4.1.2): a fixed dense MLP beside the experts, its
output mixed with the experts' by a learned per-token two-way softmax (as DeepSpeed implements
"adding the two branches"). Pyramid-Residual MoE (PR-MoE) is this layer with more experts in the
last layers; the model builds that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import check_backend, combine, dispatch, expert_offsets
from .experts import Experts, activate, check_activation, check_positive_int
from .routing import Router, Routing


class MLP(nn.Module):
    """A dense FFN d -> d_ff -> d: the residual branch of Residual-MoE (and a dense block)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        check_activation(activation)
        self.activation = activation
        self.fc_in = nn.Linear(d_model, 2 * d_ff if activation == "swiglu" else d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(activate(self.fc_in(x), self.activation))


class MoE(nn.Module):
    """A Mixture-of-Experts FFN layer, DeepSpeed-MoE's semantics by default.

    Args:
        d_model, d_ff, num_experts: model width, expert hidden width, number of experts E.
        k: experts per token. capacity_factor / eval_capacity_factor / min_capacity /
            drop_tokens / use_rts / noisy_gate_policy / second_expert_sampling / drop_policy /
            choice / bias_update_rate: the router's options (see `moelab.routing.route`).
        activation: "gelu" (the paper's GPT), "swiglu" or "relu". bias: biases in the experts.
        residual: Residual-MoE (§4.1.2): y = g₀(x)·MoE(x) + g₁(x)·MLP(x), g = softmax(W_c x + b_c).
            residual_gate="sigmoid" is Qwen-MoE's shared expert instead:
            y = MoE(x) + sigmoid(w·x)·MLP(x); residual_d_ff sets the MLP's width (default d_ff).
        renormalize: divide each token's kept weights by their sum (None: DeepSpeed's choice,
            yes for k > 1).
        backend: "index" (mapping table, the default), "einsum" (one-hot masks) or "triton"
            (the mapping table in Triton kernels; the grouped FFN reads tokens through it).
        ep_size: expert parallelism (needs an initialised process group): this rank holds
            num_experts / ep_size experts, and the token exchange runs between dispatch and
            the experts (see `moelab.dist.expert_parallel`). exchange: "flat" or "hierarchical"
            (with node_size ranks per node); tp_size > 1: the parallelism-coordinated exchange.

    ``forward(x[..., d]) -> (y[..., d], Routing)``. The layer does not add its losses to
    anything: ``routing.aux_loss`` (times a coefficient, 0.01 in the paper's scripts) and
    ``routing.z_loss`` go into the model's loss.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        k: int = 1,
        *,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        use_rts: bool = True,
        noisy_gate_policy: str | None = None,
        second_expert_sampling: bool = True,
        drop_policy: str = "position",
        choice: str = "token",
        bias_update_rate: float = 0.0,
        activation: str = "gelu",
        bias: bool = True,
        residual: bool = False,
        backend: str = "index",
        generator: torch.Generator | None = None,
        ep_size: int = 1,
        exchange: str = "flat",
        node_size: int | None = None,
        tp_size: int = 1,
        renormalize: bool | None = None,
        residual_gate: str = "softmax",
        residual_d_ff: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts),
                            ("ep_size", ep_size)):
            check_positive_int(name, value)
        check_backend(backend)
        self.d_model, self.backend = d_model, backend
        self.router = Router(
            d_model, num_experts, k=k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
            drop_tokens=drop_tokens, use_rts=use_rts, noisy_gate_policy=noisy_gate_policy,
            second_expert_sampling=second_expert_sampling, drop_policy=drop_policy,
            choice=choice, bias_update_rate=bias_update_rate, generator=generator,
            renormalize=renormalize)
        self.parallel = None
        if ep_size != 1 or tp_size != 1:
            from .dist.expert_parallel import ExpertParallel

            self.parallel = ExpertParallel(
                num_experts, ep_size, exchange=exchange, node_size=node_size, tp_size=tp_size,
                layer_config=dict(d_model=d_model, d_ff=d_ff, k=k, activation=activation,
                                  residual=residual, drop_tokens=drop_tokens))
        local_experts = num_experts // ep_size
        self.experts = Experts(local_experts, d_model, d_ff, activation=activation, bias=bias)
        self.num_experts = num_experts
        if residual_gate not in ("softmax", "sigmoid"):
            raise ValueError(f"residual_gate must be 'softmax' or 'sigmoid'; got {residual_gate!r}")
        self.residual, self.residual_gate = residual, residual_gate
        if residual:
            self.mlp = MLP(d_model, residual_d_ff or d_ff, activation=activation, bias=bias)
            # DeepSpeed: a 2-way softmax mix (Linear(d, 2) with bias); Qwen: a sigmoid gate
            self.coefficient = nn.Linear(d_model, 2 if residual_gate == "softmax" else 1,
                                         bias=residual_gate == "softmax")

    def set_backend(self, backend: str) -> None:
        check_backend(backend)
        self.backend = backend

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE input's last dim must be d_model={self.d_model}; "
                             f"got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)  # [..., d] -> [S, d]
        # backend "triton" (no expert parallelism): in eval the fused gate writes the mapping
        # table, and the grouped GEMM reads each route's token row through it, so dispatch's
        # permuted copy of the tokens is never written.
        fused = self.backend == "triton" and self.parallel is None
        routing = self.router(tokens, fused=fused)
        buffer = None if fused else dispatch(tokens, routing, self.backend)  # [E, C, d] / [N, d]
        if fused:
            from .kernels.grouped_ffn import expert_ffn  # imports Triton

            expert_out = expert_ffn(tokens, routing, self.experts)  # [E, C, d] or packed [N, d]
        elif self.parallel is not None:  # the exchange to the experts' ranks and back
            rows = routing.load if routing.capacity is None else \
                torch.full((self.num_experts,), routing.capacity, dtype=torch.long)
            expert_out = self.parallel.run_experts(self.experts, buffer, rows)
        elif routing.capacity is not None:
            expert_out = self.experts(buffer)
        else:
            expert_out = self.experts(buffer, expert_offsets(routing))  # packed [N, d]
        y = combine(expert_out, routing, self.backend).to(x.dtype)  # [S, d]
        if self.residual and self.residual_gate == "sigmoid":
            # Qwen-MoE's shared expert: y = MoE(x) + sigmoid(w · x) · MLP(x)
            y = y + torch.sigmoid(self.coefficient(tokens)) * self.mlp(tokens)
        elif self.residual:
            # §4.1.2 Residual-MoE, DeepSpeed's form: coef = softmax(W_c x + b_c) per token,
            # y = coef₀ · MoE(x) + coef₁ · MLP(x).
            coef = torch.softmax(self.coefficient(tokens), dim=-1)  # [S, 2]
            y = y * coef[:, 0:1] + self.mlp(tokens) * coef[:, 1:2]
        return y.view(x.shape), routing

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, residual={self.residual}"
