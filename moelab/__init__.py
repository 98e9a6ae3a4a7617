"""moelab: a notebook-first lab for Mixture-of-Experts, after DeepSpeed-MoE (arXiv 2201.05596).

The math lives here and imports only torch, einops and numpy; the views live in ``moelab.viz``.
"""

from .dispatch import combine, dispatch, dispatch_masks, expert_offsets
from .experts import Experts
from .inference import KVCache, generate
from .layer import MLP, MoE
from .routing import Router, Routing, expert_capacity, route

__all__ = [
    "MLP", "MoE", "Experts", "Router", "Routing", "route", "expert_capacity",
    "dispatch", "combine", "dispatch_masks", "expert_offsets", "generate", "KVCache",
]
__version__ = "0.1.0"
