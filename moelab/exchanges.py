"""The token exchanges of expert parallelism, by formula (§5.3): names, messages and volumes.

Pure Python (no torch): the expert-parallel code (`moelab.parallel`), the serving cost model
(`moelab.serving`), the parallel view, the notebooks and the benchmarks all read these numbers
from here.

Per exchange (one all-to-all) and rank, for p expert-parallel ranks, G ranks per node and L
tensor-parallel lanes:

- "flat": one all-to-all over the group, p - 1 messages;
- "hierarchical" (Fig. 8): inside the node, then among the ranks with my local index:
  (G - 1) + (p/G - 1) messages, at about twice the volume (every row moves twice);
- "tp_coordinated" (Fig. 9): the L lanes of a tensor-parallel group hold the same tokens, so
  each sends only its 1/L of them among the p/L ranks with its lane, p/L - 1 messages, and an
  all-gather over the L lanes (L - 1 messages) restores the rest on the way back.

A forward has two exchanges: to the experts and back.
"""

from __future__ import annotations

EXCHANGES = ("flat", "hierarchical", "tp_coordinated")
FORMULAS = {"flat": "p - 1", "hierarchical": "(G - 1) + (p/G - 1)",
            "tp_coordinated": "(p/L - 1) + (L - 1)"}


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}; got {exchange!r}")
    return exchange


def hops(ranks: int, exchange: str = "flat", per_node: int | None = None,
         tp_size: int = 1) -> tuple[int, int]:
    """Messages one rank sends in one all-to-all among ``ranks`` expert-parallel ranks with
    ``per_node`` of them in each node (None: all in one node), split as (inside its node,
    across nodes). The TP-coordinated all-gather is not included (see `messages_per_exchange`).
    """
    check_exchange(exchange)
    per_node = ranks if per_node is None else per_node
    if exchange == "tp_coordinated":  # only the ranks with my TP lane take part
        ranks, per_node = ranks // tp_size, max(1, per_node // tp_size)
    if exchange == "hierarchical":  # inside the node, then among one rank per node
        return per_node - 1, ranks // per_node - 1
    per_node = min(per_node, ranks)
    return per_node - 1, ranks - per_node


def messages_per_exchange(ranks: int, exchange: str = "flat", node_size: int | None = None,
                          tp_size: int = 1) -> int:
    """The paper's hop count for one exchange: flat p - 1, hierarchical (G - 1) + (p/G - 1),
    parallelism-coordinated (p/L - 1) + (L - 1) with its all-gather."""
    intra, inter = hops(ranks, exchange, node_size, tp_size)
    return intra + inter + (tp_size - 1 if exchange == "tp_coordinated" else 0)


def messages_per_forward(ranks: int, exchange: str = "flat", node_size: int | None = None,
                         tp_size: int = 1) -> int:
    """Messages one rank sends in one forward: the exchange to the experts and the one back;
    for "tp_coordinated" the all-gather over the L lanes follows the way back (once)."""
    intra, inter = hops(ranks, exchange, node_size, tp_size)
    return 2 * (intra + inter) + (tp_size - 1 if exchange == "tp_coordinated" else 0)


def volume_per_exchange(ranks: int, exchange: str = "flat", node_size: int | None = None,
                        tp_size: int = 1) -> float:
    """Bytes one rank sends in one exchange, as a multiple of its dispatched buffer B, for an
    even spread over experts: flat (p-1)/p; hierarchical (G-1)/G + (n-1)/n with n = p/G nodes
    (close to 2x); parallelism-coordinated (p/L - 1)/(p/L) of B/L (each lane sends its 1/L)."""
    check_exchange(exchange)
    if exchange == "flat":
        return (ranks - 1) / ranks
    if exchange == "hierarchical":
        nodes = ranks // node_size
        return (node_size - 1) / node_size + (nodes - 1) / nodes
    group = ranks // tp_size
    return (group - 1) / group / tp_size


def bytes_per_forward(ranks: int, exchange: str, buffer_bytes: int,
                      node_size: int | None = None, tp_size: int = 1) -> float:
    """Bytes one rank sends in one forward, for a dispatched buffer of ``buffer_bytes`` spread
    evenly: two exchanges, plus for "tp_coordinated" the all-gather of its 1/L of the outputs
    to the L - 1 other lanes."""
    volume = 2 * volume_per_exchange(ranks, exchange, node_size, tp_size) * buffer_bytes
    if exchange == "tp_coordinated":
        volume += (tp_size - 1) * buffer_bytes / tp_size
    return volume


def message_table(ranks: int, node_size: int, tp_size: int) -> list[dict]:
    """One row per exchange for a layout: messages per exchange (the paper's hop count), per
    forward, and the volume per exchange as a multiple of the buffer."""
    return [{
        "world": ranks, "node_size": node_size, "tp_size": tp_size, "exchange": name,
        "formula": FORMULAS[name],
        "messages_per_exchange": messages_per_exchange(ranks, name, node_size, tp_size),
        "messages_per_forward": messages_per_forward(ranks, name, node_size, tp_size),
        "volume": volume_per_exchange(ranks, name, node_size, tp_size),
    } for name in EXCHANGES]


def paper_layouts() -> list[dict]:
    """The paper's inference layouts: 128 and 256 GPUs, 8 per node, 8-way tensor slicing."""
    return [row for ranks in (128, 256) for row in message_table(ranks, 8, 8)]
