"""MoE after DeepSpeed: the recipes that turn the paper's layers into today's, and the published
sizes moelab's counts are checked against.

The lineage (notebook 08 draws it): the paper's Residual-MoE (a fixed dense MLP beside the
experts) became the *shared experts* of DeepSeekMoE, DeepSeek-V3 and Llama 4 (the same MLP
without the learned mix: ``residual_gate="none"``) and Qwen-MoE's sigmoid-gated shared expert;
its Pyramid (more experts where they help) became *fine-grained* experts (m times more, each 1/m
as wide, m times more chosen: the same active FLOPs, far more combinations); its load-balancing
loss became DeepSeek-V3's auxiliary-loss-free bias (``bias_update_rate``) with a tiny
sequence-wise loss, and Qwen3's global-batch loss; its softmax gate, DeepSeek-V3's sigmoid
scores with group-limited top-k and a routed scaling factor. Each of those is a RouterConfig or
MoEConfig option; the presets ``deepseek_v3`` and ``qwen3_30b_a3b`` set them as published.
"""

from __future__ import annotations

from .config import check_int
from .model import GPTConfig

#: The published sizes (billions of parameters: total, active per token), whether the active
#: figure counts the embedding table, and where they are printed: the one home of these figures.
PUBLISHED_SIZES = {
    "deepseek_v3": (671.0, 37.0, False, "DeepSeek-V3 technical report (arXiv 2412.19437), §1"),
    "qwen3_30b_a3b": (30.5, 3.3, True, "Qwen3 technical report (arXiv 2505.09388), Table 2"),
}


def published_table() -> list[dict]:
    """moelab's count of each preset beside its published total and active figures (active in
    the report's own convention: with or without the embedding table)."""
    from .model import preset
    from .sizing import size

    rows = []
    for name, (total_b, active_b, with_embedding, source) in PUBLISHED_SIZES.items():
        counted = size(preset(name))
        active = counted.active if with_embedding else counted.active_without_embedding
        rows.append({"model": name, "total_B": counted.total / 1e9, "published_total_B": total_b,
                     "active_B": active / 1e9, "published_active_B": active_b,
                     "active_counts_embedding": with_embedding, "source": source})
    return rows


def fine_grained(config: GPTConfig, m: int, n_shared: int = 0) -> GPTConfig:
    """DeepSeekMoE's recipe (Dai et al. 2024, §3) on a config, at the same active FLOPs per token:
    every expert split into m experts 1/m as wide (m× more experts, k·m of them chosen), and
    ``n_shared`` of those chosen slots turned into always-on *shared experts* (k·m - n_shared
    routed). The shared experts are one MLP of width n_shared · d_ff/m summed with no gate: the
    paper's Residual-MoE MLP without its learned mix. m=1 and no shared experts: the config
    itself."""
    m, n_shared = check_int("m", m), check_int("n_shared", n_shared, 0)
    width = config.moe.expert_d_ff or config.ffn_dim
    if width % m:
        raise ValueError(f"m={m} must divide the experts' width {width}")
    if m == 1 and n_shared == 0:
        return config
    chosen = config.moe.router.k * m
    if n_shared >= chosen:
        raise ValueError(f"n_shared={n_shared} must be below k·m = {chosen}: at the same active "
                         "FLOPs the shared experts take that many of the chosen slots")
    schedule = tuple(count * m for count in config.expert_schedule)
    options = dict(experts=schedule, expert_d_ff=width // m, k=chosen - n_shared)
    if n_shared:
        if config.moe.residual:
            raise ValueError("this config already has a residual MLP; shared experts take its "
                             "place: start from a config with residual=False")
        options.update(residual=True, residual_gate="none", residual_d_ff=n_shared * width // m)
    return config.replace(name=f"{config.name}_fine{m}_shared{n_shared}", **options)
