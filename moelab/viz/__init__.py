"""Views of moelab's data (ipywidgets + plotly). The math never imports this package.

- ``RoutingView``: one Routing (token × expert heatmap, per-expert load against capacity, a
  summary) with controls that re-route the same tokens live; ``routing_table`` and
  ``routing_figure`` are its data and its static figure.
- ``LoadBalanceView``: every MoE layer's expert load over training steps, live from a Trainer.
- ``ShapeView``: a model's layers × experts drawn as the paper's PR-MoE figure.
- ``ParallelView``: expert placement, the rank × rank token traffic, messages per rank and load
  of an expert-parallel run, live from `moelab.parallel.launch(..., on_metric=view.update)`.
- ``SpecialisationView``: expert co-activation, domain × expert selectivity and dead experts,
  live from a `moelab.specialisation.SpecialisationProbe` beside a Trainer.
- ``LatencyView``: where decode time goes (per component, backend, batch size);
  ``ServingView``: the paper-scale serving cost model with sliders.
"""

from .latency_view import (
                           LatencyView,
                           ServingView,
                           latency_figure,
                           latency_table,
                           serving_figure,
                           serving_table,
)
from .load_balance import LoadBalanceView, load_arrays, load_balance_figure
from .parallel_view import ParallelView, parallel_data, parallel_figure
from .routing_view import MAX_TOKENS, RoutingView, routing_figure, routing_table
from .shape_view import ShapeView, model_shape, shape_figure
from .specialisation_view import (
                                  SpecialisationView,
                                  specialisation_arrays,
                                  specialisation_figure,
)

__all__ = ["RoutingView", "routing_table", "routing_figure", "MAX_TOKENS",
           "LoadBalanceView", "load_arrays", "load_balance_figure",
           "ShapeView", "model_shape", "shape_figure",
           "ParallelView", "parallel_data", "parallel_figure",
           "SpecialisationView", "specialisation_arrays", "specialisation_figure",
           "LatencyView", "ServingView", "latency_figure", "latency_table", "serving_figure",
           "serving_table"]
