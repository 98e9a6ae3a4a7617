"""Parameters, FLOPs and weight bytes of any GPTConfig, from formulas (no model is built).

``python -m moelab.sizing`` prints the paper's models: moelab's count beside the paper's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    embedding: int  # token + position embeddings (the LM head is tied to the token embedding)
    flops_per_token: int  # forward FLOPs per token at full context (Kaplan et al. 2020)

    @property
    def non_expert(self) -> int:
        return self.total - self.expert

    def weight_bytes(self, dtype: str = "fp16") -> int:
        return self.total * BYTES_PER_PARAM[dtype]


def ffn_params(d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True) -> int:
    """One FFN: d -> f (2f for SwiGLU) -> d, with biases."""
    width = 2 * d_ff if activation == "swiglu" else d_ff
    return d_model * width + d_ff * d_model + ((width + d_model) if bias else 0)


def size(config: GPTConfig) -> Size:
    """Count every parameter of GPT(config) from the config alone."""
    d, f, L = config.d_model, config.ffn_dim, config.n_layer
    ffn = ffn_params(d, f, config.moe.activation)
    attention = 4 * d * d + 4 * d  # qkv (3d² + 3d) and output projection (d² + d)
    norms = 4 * d  # two LayerNorms per block
    experts_by_layer = dict(zip(config.moe_layers, config.expert_schedule, strict=True))
    total = active = expert = 0
    for layer in range(L):
        total += attention + norms
        active += attention + norms
        num_experts = experts_by_layer.get(layer, 0)
        if not num_experts:
            total += ffn
            active += ffn
            continue
        gate = num_experts * d
        residual = (ffn + 2 * d + 2) if config.moe.residual else 0  # dense MLP + coefficient
        total += num_experts * ffn + gate + residual
        active += min(config.moe.router.k, num_experts) * ffn + gate + residual
        expert += num_experts * ffn
    embedding = config.vocab_size * d + config.block_size * d
    total += embedding + 2 * d  # + final LayerNorm
    active += embedding + 2 * d
    # Forward FLOPs per token: 2 per multiply-add of every matrix the token meets (the tied LM
    # head included, embeddings excluded), plus attention scores and mixing, 2·L·n_ctx·d.
    matmul_params = active - embedding - 2 * d + config.vocab_size * d
    flops = 2 * matmul_params + 2 * L * config.block_size * d
    return Size(total=total, active=active, expert=expert, embedding=embedding,
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
