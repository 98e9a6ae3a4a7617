"""The token exchange between dispatch and the experts, as autograd functions.

Every exchange here is planned from a count matrix ``rows[src, dst]`` (rows that rank src sends to
rank dst) that every rank of the group holds, gathered once per step. So all ranks agree on every
message size by construction: ranks with different token counts, capacities or loads cannot
deadlock the exchange (DeepSpeed sizes its all-to-all from local shapes, and a mismatch hangs,
DeepSpeed #6809).

- flat: one ``all_to_all_single`` over the group: p - 1 messages per rank.
- hierarchical (§5.3, Fig. 8): a layout transform, an exchange inside each node, a second
  transform, an exchange across nodes: (G - 1) + (p/G - 1) messages per rank instead of p - 1
  (G = ranks per node), at twice the volume. Nodes are simulated by rank groups of size
  ``node_size`` so it runs on one machine. (The formulas: `moelab.exchanges`.)

The backward of an exchange is the same exchange with the count matrix transposed: it moves the
gradient rows back to where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from .groups import new_group
from .tracing import operation


@dataclass
class ExchangeStats:
    """What one rank sent in the last exchange(s): messages (peers it sent to, itself
    excluded) and bytes, accumulated over calls."""

    messages: int = 0
    bytes_sent: int = 0
    steps: list[str] = field(default_factory=list)

    def add(self, name: str, splits: list[int], self_index: int, row_bytes: int) -> None:
        self.messages += sum(1 for i, n in enumerate(splits) if n and i != self_index)
        self.bytes_sent += sum(n for i, n in enumerate(splits) if i != self_index) * row_bytes
        self.steps.append(name)


def _all_to_all(x: Tensor, send: list[int], recv: list[int], group, name: str) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    with operation(name):
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv,
                               input_split_sizes=send, group=group)
    return out


def _permute_blocks(x: Tensor, sizes: list[int], order: list[int]) -> Tensor:
    """Rows in blocks of `sizes`; return the blocks in `order`."""
    blocks = torch.split(x, sizes)
    return torch.cat([blocks[i] for i in order]) if blocks else x


def _flat(x: Tensor, rows: Tensor, rank: int, group, stats: ExchangeStats | None) -> Tensor:
    send, recv = rows[rank].tolist(), rows[:, rank].tolist()
    if stats is not None:
        stats.add("all_to_all", send, rank, x[0].numel() * x.element_size() if len(x) else 0)
    return _all_to_all(x, send, recv, group, "all_to_all (expert exchange)")


def _hierarchical(x: Tensor, rows: Tensor, rank: int, node_size: int, intra_group,
                  inter_group, stats: ExchangeStats | None) -> Tensor:
    """x: my rows ordered by destination rank; returns rows ordered by source rank."""
    p = rows.shape[0]
    nodes, g = p // node_size, node_size
    my_node, my_local = divmod(rank, g)
    row_bytes = x[0].numel() * x.element_size() if len(x) else 0
    # Transform 1: my blocks by destination (m, g') -> ordered (g', m), so that everything for
    # local rank g' of every node is contiguous.
    by_local = [m * g + lg for lg in range(g) for m in range(nodes)]
    x = _permute_blocks(x, rows[rank].tolist(), by_local)
    # Intra-node exchange: local rank g' gets what every rank of my node sends to (*, g').
    node_ranks = [my_node * g + lg for lg in range(g)]
    send = [int(rows[rank, lg::g].sum()) for lg in range(g)]
    recv = [int(rows[src, my_local::g].sum()) for src in node_ranks]
    if stats is not None:
        stats.add("intra-node all_to_all", send, my_local, row_bytes)
    x = _all_to_all(x, send, recv, intra_group, "all_to_all (hierarchical, intra-node)")
    # Transform 2: received blocks are ordered (source g_src, destination node m) -> (m, g_src).
    sizes = [int(rows[src, m * g + my_local]) for src in node_ranks for m in range(nodes)]
    x = _permute_blocks(x, sizes, [gs * nodes + m for m in range(nodes) for gs in range(g)])
    # Inter-node exchange among the ranks with my local index: node m gets its block.
    send = [int(rows[node_ranks, m * g + my_local].sum()) for m in range(nodes)]
    recv = [int(rows[n * g:(n + 1) * g, rank].sum()) for n in range(nodes)]
    if stats is not None:
        stats.add("inter-node all_to_all", send, my_node, row_bytes)
    return _all_to_all(x, send, recv, inter_group, "all_to_all (hierarchical, inter-node)")


def in_graph(x: Tensor) -> Tensor:
    """x, made part of the autograd graph when gradients are on. Every rank must run every
    exchange's backward (it is a collective), also a rank whose rows need no gradient (no tokens,
    frozen inputs): a leaf that requires grad keeps the exchange's backward in its graph."""
    if torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, rank, plan, stats):
        ctx.rows, ctx.rank, ctx.plan = rows, rank, plan
        return plan(x, rows, rank, stats)

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan(grad.contiguous(), ctx.rows.t().contiguous(), ctx.rank, None), \
            None, None, None, None


@dataclass(frozen=True)
class Exchanger:
    """An exchange over one group: ``exchanger(x, rows)`` moves my rows (ordered by destination
    group rank) and returns the rows sent to me (ordered by source group rank)."""

    group: object
    rank: int  # my rank inside `group`
    size: int
    node_size: int | None = None  # set = hierarchical
    intra_group: object = None
    inter_group: object = None

    def __call__(self, x: Tensor, rows: Tensor, stats: ExchangeStats | None = None) -> Tensor:
        return _Exchange.apply(in_graph(x), rows, self.rank, self._plan, stats)

    def _plan(self, x, rows, rank, stats):
        if self.node_size is None or self.node_size in (1, self.size):
            return _flat(x, rows, rank, self.group, stats)
        return _hierarchical(x, rows, rank, self.node_size, self.intra_group, self.inter_group,
                             stats)

    def gather_rows(self, my_rows: Tensor) -> Tensor:
        """All ranks' row-count vectors as one [size, ...] matrix (one small all_gather)."""
        parts = [torch.empty_like(my_rows) for _ in range(self.size)]
        with operation("all_gather (exchange sizes)"):
            dist.all_gather(parts, my_rows.contiguous(), group=self.group)
        return torch.stack(parts)


def hierarchical_subgroups(group_ranks: list[int], node_size: int, timeout: float | None = None):
    """The intra-node and inter-node groups of one EP group (every rank must call this for every
    EP group in the same order). Returns {global rank: (intra, inter)} for the ranks here."""
    p = len(group_ranks)
    if node_size < 1 or p % node_size:
        raise ValueError(f"node_size={node_size} must divide the expert-parallel group size {p}")
    intra = {}
    for start in range(0, p, node_size):
        ranks = group_ranks[start:start + node_size]
        handle = new_group(ranks, timeout)
        for r in ranks:
            intra[r] = handle
    inter = {}
    for local in range(node_size):
        ranks = group_ranks[local::node_size]
        handle = new_group(ranks, timeout)
        for r in ranks:
            inter[r] = handle
    return {r: (intra[r], inter[r]) for r in group_ranks}
