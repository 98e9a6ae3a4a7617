"""The MoE layer: x -> Router -> Routing -> dispatch -> Experts -> combine -> y.

``residual=True`` is the paper's Residual-MoE (§4.1.2): a fixed dense MLP beside the experts, its
output mixed with the experts' by a learned per-token two-way softmax (as DeepSpeed implements
"adding the two branches"). Pyramid-Residual MoE (PR-MoE) is this layer with more experts in the
last layers; the model builds that.

The code that runs the experts is chosen once (at construction, `set_backend` and
`moelab.parallel.parallelize`), never per call: "local" (this process holds every expert),
"fused" (backend "triton": the grouped GEMM reads each route's token through the mapping table,
so dispatch writes no copy) or "parallel" (expert parallelism: the exchange to the experts'
ranks and back, installed from outside by ``parallelize``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import Config, check_int, documented, option, resolve
from .dispatch import BACKENDS, Combine, Dispatch, check_backend
from .experts import ACTIVATIONS, GATED, SWIGLU_ALPHA, SWIGLU_LIMIT, Experts, activate
from .router import Router, RouterConfig
from .routing import Routing

RESIDUAL_GATES = ("softmax", "sigmoid", "none")
RUNNERS = ("local", "fused", "parallel")


@documented
@dataclass(frozen=True)
class MoEConfig(Config):
    """An MoE layer's options except its sizes (d_model, d_ff, num_experts): the router's, the
    experts', the residual branch's and the backend. `moelab.model.GPTConfig` nests one, so every
    option reaches every MoE layer of a GPT."""

    router: RouterConfig = option(RouterConfig(), "the gate's options (see RouterConfig)",
                                  kind="config")
    activation: str = option(
        "gelu", "the FFN activation: 'gelu' (the paper's GPT), 'swiglu' (Mixtral, Qwen, "
                "DeepSeek), 'relu' (Switch) or 'clamped_swiglu' (gpt-oss); a GPT's dense FFNs "
                "use it too", choices=ACTIVATIONS)
    swiglu_alpha: float = option(SWIGLU_ALPHA, "clamped_swiglu's sigmoid scale (gpt-oss: "
                                               "1.702)", above=0)
    swiglu_limit: float = option(SWIGLU_LIMIT, "clamped_swiglu's clamp (gpt-oss: 7.0)", above=0)
    bias: bool = option(True, "biases in the experts, the residual MLP and a GPT's dense FFNs "
                              "(gpt-oss's experts have them; Mixtral's, Qwen's and DeepSeek's "
                              "do not)")
    expert_d_ff: int | None = option(
        None, "the routed experts' hidden width; None = d_ff. Fine-grained experts (DeepSeekMoE, "
              "Dai et al. 2024; Qwen3-MoE) are m× more experts of width d_ff/m with k·m chosen: "
              "the same active FLOPs (`moelab.modern.fine_grained`)", kind="int", low=1)
    residual: bool = option(
        False, "Residual-MoE (§4.1.2): a dense MLP beside the experts, "
               "y = g₀(x)·MoE(x) + g₁(x)·MLP(x) with g = softmax(W_c x + b_c). Its descendants "
               "are the shared experts of DeepSeekMoE / DeepSeek-V3 / Llama 4 (residual_gate "
               "'none': the fixed MLP without the learned mix) and Qwen-MoE (gate 'sigmoid')")
    residual_gate: str = option(
        "softmax", "'softmax' (DeepSpeed's two-way mix), 'sigmoid' (Qwen-MoE's shared expert: "
                   "y = MoE(x) + sigmoid(w·x)·MLP(x)) or 'none' (DeepSeekMoE's shared experts: "
                   "y = MoE(x) + MLP(x))", choices=RESIDUAL_GATES)
    residual_d_ff: int | None = option(
        None, "the residual MLP's hidden width; None = d_ff. n shared experts of width w are one "
              "MLP of width n·w", kind="int", low=1)
    scale_expert_input: bool = option(
        False, "multiply each route's expert *input* by its combine weight instead of the "
               "expert's output: y = Σ_j E_j(w_j · x) (Llama 4) rather than Σ_j w_j · E_j(x) "
               "(every other MoE); the same only for experts that are linear maps, so a "
               "different model for SwiGLU ones")
    backend: str = option("index", "'index' (the mapping table), 'einsum' (GShard's one-hot "
                                   "masks) or 'triton' (the mapping table in Triton kernels)",
                          choices=BACKENDS)

    def validate(self) -> None:
        if self.residual_d_ff is not None and not self.residual:
            raise ValueError(f"residual_d_ff={self.residual_d_ff} sets the residual MLP's width, "
                             "but residual=False: set residual=True too, or leave it None")


def weight_expert_input(buffer: Tensor, routing: Routing) -> tuple[Tensor, Routing]:
    """Llama 4's weighting, y = Σ_j E_j(w_j · x): every buffer row (one route's token) times
    its route's weight, and a copy of the Routing whose combine weights are 1 for kept routes
    (0 for dropped ones), so the combine only sums."""
    flat = buffer.reshape(-1, buffer.shape[-1])  # [rows, d]
    num_rows = flat.shape[0]
    rows = routing.row.reshape(-1)  # [S·k]: each route's buffer row, -1 where dropped
    # row_weight[row(s, j)] = w_sj; dropped routes (weight 0) write a spare last row   [rows]
    target = torch.where(rows >= 0, rows, num_rows)
    row_weight = routing.weight.new_zeros(num_rows + 1).index_put(
        (target,), routing.weight.reshape(-1))[:num_rows]
    scaled = flat * row_weight[:, None].to(flat.dtype)  # [rows, d]
    summed = copy.copy(routing)  # shares the mapping table and what it computed once
    summed.weight = routing.kept.to(routing.weight.dtype)  # [S, k]
    return scaled.view(buffer.shape), summed


class MLP(nn.Module):
    """A dense FFN d -> d_ff -> d: the residual branch of Residual-MoE (and a dense block)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True, *,
                 swiglu_alpha: float = SWIGLU_ALPHA, swiglu_limit: float = SWIGLU_LIMIT):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
        self.activation = activation
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.fc_in = nn.Linear(d_model, 2 * d_ff if activation in GATED else d_ff, bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = activate(self.fc_in(x), self.activation, alpha=self.swiglu_alpha,
                     limit=self.swiglu_limit)
        return self.fc_out(h)


class MoE(nn.Module):
    """A Mixture-of-Experts FFN layer, DeepSpeed-MoE's semantics by default.

    ``MoE(d_model, d_ff, num_experts, config)`` with an `MoEConfig`, or with any of its options
    (router options included) by name: ``MoE(64, 256, 8, k=2, residual=True)``.
    ``generator``: a torch.Generator for the router's random draws.

    ``forward(x[..., d]) -> (y[..., d], Routing)``. The layer does not add its losses to
    anything: ``routing.aux_loss`` (times a coefficient, 0.01 in the paper's scripts) and
    ``routing.z_loss`` go into the model's loss.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int,
                 config: MoEConfig | None = None, *, generator: torch.Generator | None = None,
                 **options) -> None:
        super().__init__()
        config = resolve(MoEConfig, config, options)
        self.d_model = check_int("d_model", d_model)
        self.d_ff = check_int("d_ff", d_ff)
        self.num_experts = check_int("num_experts", num_experts)
        check_backend(config.backend)
        self._config = config
        activation = dict(activation=config.activation, bias=config.bias,
                          swiglu_alpha=config.swiglu_alpha, swiglu_limit=config.swiglu_limit)
        self.router = Router(d_model, num_experts, config.router, generator=generator)
        self.dispatch = Dispatch(config.backend)
        self.experts = Experts(num_experts, d_model, config.expert_d_ff or d_ff, **activation)
        self.combine = Combine(config.backend)
        if config.residual:
            self.mlp = MLP(d_model, config.residual_d_ff or d_ff, **activation)
            # DeepSpeed: a 2-way softmax mix (Linear(d, 2) with bias); Qwen: a sigmoid gate;
            # DeepSeekMoE's shared experts: none
            if config.residual_gate != "none":
                sigmoid = config.residual_gate == "sigmoid"
                self.coefficient = nn.Linear(d_model, 1 if sigmoid else 2, bias=not sigmoid)
        self.choose_runner()

    # ---- what runs the experts, chosen once

    @property
    def config(self) -> MoEConfig:
        """The layer's options, its router's current ones included (the router's config may be
        replaced, e.g. by `moelab.generation.inference_mode`)."""
        if self._config.router is not self.router.config:
            self._config = dataclasses.replace(self._config, router=self.router.config)
        return self._config

    @property
    def backend(self) -> str:
        return self._config.backend

    @property
    def residual(self) -> bool:
        return self._config.residual

    @property
    def parallel(self):
        """The expert-parallel plan installed by `moelab.parallel.parallelize` (None: local)."""
        return self.experts.parallel

    def set_backend(self, backend: str) -> None:
        check_backend(backend)
        self._config = self.config.replace(backend=backend)
        self.dispatch.backend = self.combine.backend = backend
        self.choose_runner()

    def choose_runner(self) -> None:
        """Pick the code that runs the experts from the backend and the parallel plan (called
        by the constructor, `set_backend` and `parallelize`)."""
        fused = self.backend == "triton" and self.parallel is None
        if fused and self._config.scale_expert_input:
            raise ValueError("backend='triton' reads each route's token inside the grouped FFN "
                             "kernel, so it cannot scale the experts' input: "
                             "scale_expert_input=True needs backend='index' or 'einsum'")
        if fused:
            from .kernels import GROUPED_FFN_ACTIVATIONS
            from .kernels.gating import fused_route  # the layer imports the kernels, never

            if self.experts.activation not in GROUPED_FFN_ACTIVATIONS:
                raise ValueError(f"backend='triton': the grouped FFN kernel computes "
                                 f"{GROUPED_FFN_ACTIVATIONS}, not {self.experts.activation!r}; "
                                 "use backend='index'")
            self.router.fused_gate = fused_route  # the router
        else:
            self.router.fused_gate = None
        self.dispatch.passthrough = fused  # the fused GEMM reads tokens through the table
        self.runner = "parallel" if self.parallel is not None else "fused" if fused else "local"

    def _run_local(self, buffer: Tensor, routing: Routing) -> Tensor:
        if routing.capacity is None:
            return self.experts(buffer, routing.offsets, load=routing.load)  # packed [N, d]
        return self.experts(buffer, load=self.capacity_load(routing))  # [E, C, d]

    @staticmethod
    def capacity_load(routing: Routing) -> Tensor | None:
        """Capacity layout [E, C, d]: when most slots are empty (decode: a few tokens, C from
        min_capacity), the load [E] that tells the bank which experts have rows, so that only
        those run (`Experts.path`); otherwise None (every expert runs, and nothing waits for
        the device to learn the load)."""
        sparse = routing.capacity * routing.num_experts > 2 * routing.expert.numel()
        return routing.load if sparse else None

    def _run_fused(self, tokens: Tensor, routing: Routing) -> Tensor:
        from .kernels.grouped_ffn import expert_ffn

        return expert_ffn(tokens, routing, self.experts)  # [E, C, d] or packed [N, d]

    def _run_parallel(self, buffer: Tensor, routing: Routing) -> Tensor:
        return self.parallel.run_experts(self.experts, buffer, routing)

    _RUNNERS = {"local": _run_local, "fused": _run_fused, "parallel": _run_parallel}

    # ---- forward

    def forward(self, x: Tensor) -> tuple[Tensor, Routing]:
        self._check_input(x)
        tokens = x.reshape(-1, self.d_model)  # [..., d] -> [S, d]
        # the gate writes the mapping table ([B, T, d] input: sequences of T tokens)
        routing = self.router(tokens, x.shape[-2] if x.dim() >= 3 else None)
        buffer = self.dispatch(tokens, routing)  # [E, C, d] or packed [N, d]
        combined = routing
        if self._config.scale_expert_input:
            buffer, combined = weight_expert_input(buffer, routing)
        expert_out = self._RUNNERS[self.runner](self, buffer, routing)  # same layout
        y = self.combine(expert_out, combined).to(x.dtype)  # [S, d]
        if self.residual and self._config.residual_gate == "none":
            # DeepSeekMoE's shared experts: y = MoE(x) + MLP(x), always on, no learned mix
            y = y + self.mlp(tokens)
        elif self.residual and self._config.residual_gate == "sigmoid":
            # Qwen-MoE's shared expert: y = MoE(x) + sigmoid(w · x) · MLP(x)
            y = y + torch.sigmoid(self.coefficient(tokens)) * self.mlp(tokens)
        elif self.residual:
            # §4.1.2 Residual-MoE, DeepSpeed's form: coef = softmax(W_c x + b_c) per token,
            # y = coef₀ · MoE(x) + coef₁ · MLP(x).
            coef = torch.softmax(self.coefficient(tokens), dim=-1)  # [S, 2]
            y = y * coef[:, 0:1] + self.mlp(tokens) * coef[:, 1:2]
        return y.view(x.shape), routing

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"MoE input must be a tensor [..., d_model={self.d_model}]; got "
                             f"{type(x).__name__} (convert it with torch.as_tensor(x, "
                             f"dtype=torch.float32))")
        if not x.is_floating_point():
            raise ValueError(f"MoE input must be floating point (token vectors); got {x.dtype}: "
                             "token ids go through an embedding first")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoE input's last dim must be d_model={self.d_model}; "
                             f"got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"runner={self.runner!r}, residual={self.residual}"
