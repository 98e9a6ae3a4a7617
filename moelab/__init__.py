"""moelab: a notebook-first lab for Mixture-of-Experts, after DeepSpeed-MoE (arXiv 2201.05596).

The math lives here and imports only torch, einops and numpy; the views live in ``moelab.viz``,
expert parallelism in ``moelab.parallel``.
"""

from .dispatch import combine, dispatch, dispatch_masks
from .experts import Experts
from .generation import generate
from .layer import MLP, MoE, MoEConfig
from .model import GPT, GPTConfig, KVCache, preset
from .router import Router, RouterConfig, route
from .routing import Routing, expert_capacity

__all__ = [
    "MLP", "MoE", "MoEConfig", "Experts", "Router", "RouterConfig", "Routing", "route",
    "expert_capacity", "dispatch", "combine", "dispatch_masks", "generate", "KVCache", "GPT",
    "GPTConfig", "preset",
]
__version__ = "0.1.0"
