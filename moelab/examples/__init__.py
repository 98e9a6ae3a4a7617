"""Examples of moelab in use: the launch targets that notebook 06, the benchmarks and the tests
run on every rank (ranks import a target by module and name, so these live in an importable
package). They show how the library is used; the library never imports them.

- `parallel_checks`: expert parallelism against one process (layer, training, resharding);
- `parallel_demo`: exchange comparisons, timing and a live training run for ParallelView.
"""
