"""Parameters, FLOPs and weight bytes of any GPTConfig, from formulas (no model is built).

``python -m moelab.sizing`` prints the paper's models: moelab's count beside the paper's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from .experts import GATED
from .model import PRESETS, GPTConfig

BYTES_PER_PARAM = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}

# The published size of each paper model (billions of parameters) and where it is printed: the
# one home of these figures (moelab.serving.TABLE6 and the notebooks read them from here).
PAPER_SIZES = {
    "paper_350m_moe128": (13.0, "paper, Table 2"),
    "paper_1_3b_moe128": (52.0, "paper, Table 2"),
    "paper_350m_pr_moe_32_64": (4.0, "paper, Table 4"),
    "paper_1_3b_pr_moe_64_128": (31.0, "paper, Table 4"),
    "paper_350m_mos_l21": (3.5, "paper, Table 5"),
    "paper_1_3b_mos_l21": (27.0, "paper, Table 5"),
    "serve_2_4b_moe128": (107.7, "paper, Table 6"),
    "serve_8b_moe128": (349.0, "paper, Table 6"),
    # The paper's Table 6 prints 1064.9B with 40 layers, which cannot both hold (40 layers of
    # this width make ~1.4T); DeepSpeed's MoE-inference tutorial gives 1046.9B with 30 layers,
    # the model moelab's preset builds, so that is the figure it is compared with.
    "serve_24b_moe128": (1046.9, "DeepSpeed tutorial; Table 6 prints 1064.9"),
    "serve_47b_moe128": (2024.0, "paper, Table 6"),
}
PAPER_SIZES_B = {name: billions for name, (billions, _) in PAPER_SIZES.items()}


@dataclass(frozen=True)
class Size:
    total: int  # every parameter
    active: int  # parameters one token's forward pass uses (k experts per MoE layer)
    expert: int  # parameters inside expert banks
    embedding: int  # token + position embeddings (an untied LM head is not counted here)
    flops_per_token: int  # forward FLOPs per token at full context (Kaplan et al. 2020)

    @property
    def non_expert(self) -> int:
        return self.total - self.expert

    @property
    def active_without_embedding(self) -> int:
        """``active`` without the token and position tables (a token reads one row of each):
        the convention of reports that count only the matrices a token is multiplied by
        (DeepSeek-V3's 37B; GPT-3-style names, 1.3B, count the tables)."""
        return self.active - self.embedding

    def weight_bytes(self, dtype: str = "fp16") -> int:
        return self.total * BYTES_PER_PARAM[dtype]


def ffn_params(d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True) -> int:
    """One FFN: d -> f (2f for a gated activation) -> d, with or without biases."""
    width = 2 * d_ff if activation in GATED else d_ff
    return d_model * width + d_ff * d_model + ((width + d_model) if bias else 0)


def block_params(config: GPTConfig) -> list[dict]:
    """Parameters of every block, by part: ``attention`` (qkv, output projection, the two
    LayerNorms), ``ffn`` (a dense block's FFN), ``experts`` (the count), ``expert`` (one routed
    expert's FFN), ``gate`` (the router), ``residual`` (the MLP beside the experts: Residual-MoE,
    or shared experts, and its gate). The one place a block's shape becomes a count:
    `size` and the serving cost model both read it."""
    d, moe = config.d_model, config.moe
    attention = 4 * d * d + 4 * d + 4 * d  # qkv (3d² + 3d), projection (d² + d), 2 LayerNorms
    dense = ffn_params(d, config.ffn_dim, moe.activation, moe.bias)
    expert = ffn_params(d, moe.expert_d_ff or config.ffn_dim, moe.activation, moe.bias)
    residual = 0
    if moe.residual:
        residual = ffn_params(d, moe.residual_d_ff or config.ffn_dim, moe.activation, moe.bias)
        residual += {"softmax": 2 * d + 2, "sigmoid": d, "none": 0}[moe.residual_gate]
    experts_by_layer = dict(zip(config.moe_layers, config.expert_schedule, strict=True))
    blocks = []
    for layer in range(config.n_layer):
        num_experts = experts_by_layer.get(layer, 0)
        if not num_experts:
            blocks.append(dict(attention=attention, ffn=dense, experts=0, expert=0, gate=0,
                               residual=0))
            continue
        gate = num_experts * d + (num_experts if moe.router.router_bias else 0)
        blocks.append(dict(attention=attention, ffn=0, experts=num_experts, expert=expert,
                           gate=gate, residual=residual))
    return blocks


def size(config: GPTConfig) -> Size:
    """Count every parameter of GPT(config) from the config alone."""
    d, k = config.d_model, config.moe.router.k
    total = active = expert_total = 0
    for block in block_params(config):
        shared = block["attention"] + block["ffn"] + block["gate"] + block["residual"]
        total += shared + block["experts"] * block["expert"]
        active += shared + min(k, block["experts"]) * block["expert"]
        expert_total += block["experts"] * block["expert"]
    embedding = config.vocab_size * d + config.block_size * d
    head = 0 if config.tie_embeddings else config.vocab_size * d
    total += embedding + head + 2 * d  # + final LayerNorm
    active += embedding + head + 2 * d
    # Forward FLOPs per token: 2 per multiply-add of every matrix the token meets (the LM head
    # included, embeddings excluded), plus attention scores and mixing, 2·L·n_ctx·d.
    matmul_params = active - embedding - 2 * d + (config.vocab_size * d if not head else 0)
    flops = 2 * matmul_params + 2 * config.n_layer * config.block_size * d
    return Size(total=total, active=active, expert=expert_total, embedding=embedding,
                flops_per_token=flops)


def paper_table() -> list[dict]:
    """moelab's count for each paper model beside the published figure and its source."""
    rows = []
    for name, (paper_b, source) in PAPER_SIZES.items():
        ours = size(PRESETS[name]).total / 1e9
        rows.append({"model": name, "moelab_B": ours, "paper_B": paper_b,
                     "ratio": ours / paper_b, "source": source})
    return rows


def main() -> None:
    print(f"{'model':<28} {'moelab (B)':>11} {'published':>10} {'ratio':>7} {'active (B)':>11}"
          f"  source")
    for row in paper_table():
        active = size(PRESETS[row["model"]]).active / 1e9
        print(f"{row['model']:<28} {row['moelab_B']:>11.1f} {row['paper_B']:>10.1f} "
              f"{row['ratio']:>7.3f} {active:>11.2f}  {row['source']}")


if __name__ == "__main__":
    main()
