"""Views of moelab's data (ipywidgets + plotly). The math never imports this package.

``RoutingView`` draws one Routing (token × expert heatmap, per-expert load against capacity,
a summary) with controls that re-route the same tokens live; ``routing_table`` and
``routing_figure`` are its data and its static figure.
"""

from .routing_view import MAX_TOKENS, RoutingView, routing_figure, routing_table

__all__ = ["RoutingView", "routing_table", "routing_figure", "MAX_TOKENS"]
