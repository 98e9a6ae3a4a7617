#!/usr/bin/env python
"""Benchmark of moelab's Triton kernels on a GPU: roofline ceilings first, then the kernels.

    python benchmarks/bench_kernels.py [--out benchmarks/RESULTS.md]      # a CUDA GPU, ~5 min
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --dry-run      # CPU, tiny, seconds

One run, in this order (bf16, CUDA, ``triton.testing.do_bench`` medians after warm-up):

1. Ceilings, measured here: a large bf16 ``torch.mm`` (8192³) in TFLOP/s, and a large device copy
   (2 GiB, read + write counted) in GB/s. Every later number is a % of one of them.
2. Grouped expert FFN (``moelab.kernels.expert_ffn``, SwiGLU, no bias: the Mixtral expert) for
   (d_model, d_ff) in {(4096, 14336), (2048, 8192)}, E in {8, 64}, k = 2, m tokens per expert in
   {1, 16, 64, 256, 1024} (T = m·E/k tokens, routed round-robin so every expert has exactly m
   rows): TFLOP/s (6·T·k·d·f FLOPs) and % of the matmul ceiling; the torch path (index dispatch
   + batched matmul) beside it. Goal: >= 60% of the ceiling at m >= 256.
3. Decode: the same runs at m <= 16 as bandwidth: bytes of expert weights touched / time, % of the
   copy ceiling. Goal: >= 75%.
4. Gating (``fused_route`` vs ``moelab.route``) and permute (Triton dispatch / combine vs the
   "index" backend) times.
5. The whole MoE layer (the paper's GPT expert: GELU, bias; top-2, capacity factor 1, eval) with
   backend "einsum", "index" and "triton": the paper's before/after ("over 6x" for the MoE
   kernels together). Goal: "triton" >= 6x faster than "einsum" at E = 64. einsum is skipped where
   its one-hot products would exceed ~2·10¹² multiply-adds.
6. Bytes not copied: what reading token rows through the mapping table inside the GEMM saves
   against dispatching a permuted copy first (arithmetic, not timing).

``--dry-run``: tiny shapes, float32, on the CPU under the Triton interpreter (set
TRITON_INTERPRET=1), timed with perf_counter: it only proves the script runs (the test suite runs
it); its timings mean nothing. ``--out FILE`` replaces the section between
``<!-- bench_kernels:start -->`` and ``<!-- bench_kernels:end -->`` in FILE (appends it if absent);
a dry run writes only the bytes table and says that no GPU numbers were measured.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _report, also when loaded by path

from _report import write_section  # noqa: E402

import moelab  # noqa: E402
from moelab import Experts, MoE, Routing  # noqa: E402

START, END = "<!-- bench_kernels:start -->", "<!-- bench_kernels:end -->"
EINSUM_MAX_MACS = 2e12


@dataclass(frozen=True)
class Grid:
    shapes: tuple[tuple[int, int], ...]  # (d_model, d_ff)
    experts: tuple[int, ...]
    tokens_per_expert: tuple[int, ...]
    layer_tokens: tuple[int, ...]
    gate_tokens: tuple[int, ...]
    k: int = 2
    mm_size: int = 8192
    copy_bytes: int = 2 << 30


GPU_GRID = Grid(shapes=((4096, 14336), (2048, 8192)), experts=(8, 64),
                tokens_per_expert=(1, 16, 64, 256, 1024), layer_tokens=(64, 512, 4096),
                gate_tokens=(512, 4096, 32768))
DRY_GRID = Grid(shapes=((32, 64),), experts=(4,), tokens_per_expert=(1, 16), layer_tokens=(24,),
                gate_tokens=(40,), mm_size=256, copy_bytes=16 << 20)


# ------------------------------------------------------------------------------------- timing

def timer(device: str):
    """ms per call: triton.testing.do_bench (median) on a GPU, perf_counter medians on the CPU."""
    if device == "cuda":
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return bench

    def bench_cpu(fn, repeats: int = 3):
        fn()  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    return bench_cpu


def balanced_routing(num_tokens: int, num_experts: int, k: int, device: str) -> Routing:
    """Dropless routing with route r = s·k + j to expert r mod E, slot r div E: every expert gets
    exactly T·k/E rows and each token k distinct experts (k <= E)."""
    routes = torch.arange(num_tokens * k, device=device)
    expert = (routes % num_experts).view(num_tokens, k)
    slot = (routes // num_experts).view(num_tokens, k)
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts, device=device)
    counts = torch.bincount(expert.reshape(-1), minlength=num_experts)
    zero = torch.zeros((), device=device)
    return Routing(expert=expert, weight=torch.full((num_tokens, k), 1.0 / k, device=device),
                   slot=slot, capacity=None, probs=probs, counts=counts, aux_loss=zero,
                   z_loss=zero)


def make_experts(num_experts, d_model, d_ff, activation, bias, dtype, device) -> Experts:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate (and initialise) directly in the bench dtype
    try:
        with torch.device(device):
            return Experts(num_experts, d_model, d_ff, activation=activation, bias=bias)
    finally:
        torch.set_default_dtype(previous)


def torch_ffn(experts, x, routing, offsets):
    """The torch path: index dispatch (a permuted copy), then the padded batched FFN."""
    return experts.forward_packed(moelab.dispatch(x, routing, "index"), offsets)


def permute_round_trip(x, routing, backend):
    return moelab.combine(moelab.dispatch(x, routing, backend), routing, backend)


def relative_error(got, expected) -> float:
    """max |got - expected| / max |expected|, in float32: a check that the timed kernels compute
    what the torch path computes (bf16 rounding gives ~1e-2)."""
    expected = expected.float()
    return float((got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- sections

def ceilings(grid: Grid, dtype, device, bench) -> tuple[float, float, list[str]]:
    n = grid.mm_size
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_ms = bench(partial(torch.mm, a, b))
    tflops = 2 * n ** 3 / (mm_ms * 1e-3) / 1e12
    del a, b
    elements = grid.copy_bytes // 2
    src = torch.empty(elements, dtype=torch.bfloat16 if device == "cuda" else torch.float16,
                      device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = bench(partial(dst.copy_, src))
    gbps = 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9  # read + write
    del src, dst
    free()
    lines = ["## Ceilings (measured on this device)", "",
             "| ceiling | how | value |", "|---|---|---|",
             f"| matmul | torch.mm {n}x{n}x{n}, {str(dtype).removeprefix('torch.')} | "
             f"{tflops:.1f} TFLOP/s |",
             f"| copy | {grid.copy_bytes / 2**30:.2f} GiB device copy (read + write) | "
             f"{gbps:.0f} GB/s |", ""]
    return tflops, gbps, lines


def grouped_ffn_section(grid, dtype, device, bench, mm_tflops, copy_gbps) -> list[str]:
    from moelab.kernels import expert_ffn

    compute = ["## Grouped expert FFN (SwiGLU, no bias; expert_ffn reads tokens through the "
               "mapping table)", "",
               "| d_model | d_ff | E | k | tokens/expert | tokens | triton ms | TFLOP/s | "
               "% of matmul | torch (index) ms | speed-up | rel. error |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    decode = ["## Decode: grouped FFN as weight streaming (tokens/expert <= 16)", "",
              "| d_model | d_ff | E | tokens/expert | experts touched | weight bytes | "
              "triton ms | GB/s | % of copy |", "|---|---|---|---|---|---|---|---|---|"]
    k = grid.k
    for d_model, d_ff in grid.shapes:
        for num_experts in grid.experts:
            experts = make_experts(num_experts, d_model, d_ff, "swiglu", False, dtype, device)
            for m in grid.tokens_per_expert:
                num_tokens = max(1, m * num_experts // k)
                routing = balanced_routing(num_tokens, num_experts, k, device)
                x = torch.randn(num_tokens, d_model, dtype=dtype, device=device)
                offsets = routing.offsets
                with torch.no_grad():
                    error = relative_error(expert_ffn(x, routing, experts),
                                           torch_ffn(experts, x, routing, offsets))
                    triton_ms = bench(partial(expert_ffn, x, routing, experts))
                    torch_ms = bench(partial(torch_ffn, experts, x, routing, offsets))
                flops = 6 * num_tokens * k * d_model * d_ff
                tflops = flops / (triton_ms * 1e-3) / 1e12
                compute.append(
                    f"| {d_model} | {d_ff} | {num_experts} | {k} | {m} | {num_tokens} | "
                    f"{triton_ms:.3f} | {tflops:.1f} | {100 * tflops / mm_tflops:.0f}% | "
                    f"{torch_ms:.3f} | {torch_ms / triton_ms:.2f}x | {error:.1e} |")
                if m <= 16:
                    touched = int((routing.load > 0).sum())
                    weight_bytes = touched * 3 * d_model * d_ff * experts.w_in.element_size()
                    gbps = weight_bytes / (triton_ms * 1e-3) / 1e9
                    decode.append(
                        f"| {d_model} | {d_ff} | {num_experts} | {m} | {touched} | "
                        f"{weight_bytes / 1e9:.2f} GB | {triton_ms:.3f} | {gbps:.0f} | "
                        f"{100 * gbps / copy_gbps:.0f}% |")
                del x, routing
            del experts
            free()
    return compute + [""] + decode + [""]


def gating_permute_section(grid, dtype, device, bench) -> list[str]:
    from moelab.kernels import fused_route

    lines = ["## Gating and permute", "",
             "| tokens | E | k | d_model | route() ms | fused_route ms | index dispatch+combine "
             "ms | triton dispatch+combine ms |", "|---|---|---|---|---|---|---|---|"]
    d_model = grid.shapes[0][0]
    for num_tokens in grid.gate_tokens:
        for num_experts in grid.experts:
            logits = torch.randn(num_tokens, num_experts, device=device)
            x = torch.randn(num_tokens, d_model, dtype=dtype, device=device)
            with torch.no_grad():
                torch_gate = bench(partial(moelab.route, logits, k=grid.k, training=False))
                fused_gate = bench(partial(fused_route, logits, k=grid.k))
                routing = moelab.route(logits, k=grid.k, training=False)
                times = {}
                for backend in ("index", "triton"):
                    times[backend] = bench(partial(permute_round_trip, x, routing, backend))
            lines.append(f"| {num_tokens} | {num_experts} | {grid.k} | {d_model} | "
                         f"{torch_gate:.3f} | {fused_gate:.3f} | {times['index']:.3f} | "
                         f"{times['triton']:.3f} |")
            del logits, x, routing
    free()
    return lines + [""]


def layer_section(grid, dtype, device, bench) -> list[str]:
    lines = ["## MoE layer: einsum vs index vs triton (GELU experts with bias, top-2, capacity "
             "factor 1, eval)", "",
             "| d_model | d_ff | E | tokens | C | einsum ms | index ms | triton ms | "
             "einsum/triton | index/triton | rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d_model, d_ff in grid.shapes:
        for num_experts in grid.experts:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                with torch.device(device):
                    layer = MoE(d_model, d_ff, num_experts, k=grid.k).eval()
            finally:
                torch.set_default_dtype(previous)
            for num_tokens in grid.layer_tokens:
                x = torch.randn(num_tokens, d_model, dtype=dtype, device=device)
                capacity = moelab.expert_capacity(num_tokens, num_experts, 1.0, grid.k)
                times, outputs = {}, {}
                for backend in ("einsum", "index", "triton"):
                    if backend == "einsum" and \
                            num_tokens * num_experts * capacity * d_model > EINSUM_MAX_MACS:
                        times[backend] = float("nan")
                        continue
                    layer.set_backend(backend)
                    with torch.no_grad():
                        outputs[backend] = layer(x)[0]
                        times[backend] = bench(partial(layer, x))
                einsum = ("skipped" if times["einsum"] != times["einsum"]
                          else f"{times['einsum']:.3f}")
                ratio = ("n/a" if times["einsum"] != times["einsum"]
                         else f"{times['einsum'] / times['triton']:.1f}x")
                lines.append(f"| {d_model} | {d_ff} | {num_experts} | {num_tokens} | {capacity} |"
                             f" {einsum} | {times['index']:.3f} | {times['triton']:.3f} | "
                             f"{ratio} | {times['index'] / times['triton']:.2f}x | "
                             f"{relative_error(outputs['triton'], outputs['index']):.1e} |")
                del outputs
                del x
            del layer
            free()
    return lines + [""]


SWEEP_BLOCKS = ((16, 64, 128), (16, 128, 128), (32, 64, 128), (64, 128, 64), (128, 128, 64),
                (128, 64, 64), (128, 128, 32), (64, 256, 64))


def sweep_section(grid, dtype, device, bench) -> list[str]:
    """The grouped FFN's time for several (BLOCK_M, BLOCK_N, BLOCK_K) at one decode-size and
    one compute-bound point: the data for choosing ``grouped_ffn._blocks``' defaults."""
    from moelab.kernels import expert_ffn
    from moelab.kernels.grouped_ffn import _blocks

    d_model, d_ff = grid.shapes[0]
    num_experts = grid.experts[0]
    points = (min(grid.tokens_per_expert[1:2] or grid.tokens_per_expert),
              max(grid.tokens_per_expert))
    sweep = SWEEP_BLOCKS if grid is GPU_GRID else SWEEP_BLOCKS[:2]  # dry run: compile 2, not 8
    lines = [f"## Tile sweep: grouped FFN ms by (BLOCK_M, BLOCK_N, BLOCK_K), d_model {d_model}, "
             f"d_ff {d_ff}, E {num_experts}, k {grid.k}", "",
             "| tokens/expert | default blocks | default ms | "
             + " | ".join("x".join(map(str, b)) for b in sweep) + " |",
             "|---|---|---|" + "---|" * len(sweep)]
    experts = make_experts(num_experts, d_model, d_ff, "swiglu", False, dtype, device)
    for m in points:
        num_tokens = max(1, m * num_experts // grid.k)
        routing = balanced_routing(num_tokens, num_experts, grid.k, device)
        x = torch.randn(num_tokens, d_model, dtype=dtype, device=device)
        cells = []
        with torch.no_grad():
            default = bench(partial(expert_ffn, x, routing, experts))
            for blocks in sweep:
                try:
                    run = partial(expert_ffn, x, routing, experts, blocks=blocks)
                    cells.append(f"{bench(run):.3f}")
                except Exception as error:  # noqa: BLE001 - e.g. out of shared memory
                    cells.append(type(error).__name__)
        chosen = "x".join(map(str, _blocks(m, device == "cpu")))
        lines.append(f"| {m} | {chosen} | {default:.3f} | " + " | ".join(cells) + " |")
    del experts
    free()
    return lines + [""]


def bytes_section(grid: Grid, bytes_per_element: int) -> list[str]:
    """What the scattered first GEMM saves against dispatch-then-GEMM, per layer forward."""
    lines = ["## Bytes not copied: reading tokens through the mapping table inside the GEMM", "",
             "Dispatch-then-GEMM reads the tokens (S·d), writes the permuted copy (N·d, N = S·k "
             "kept routes) and the GEMM reads it back; the scattered GEMM reads each route's row "
             "straight from the tokens. Per layer forward that is (S + N)·d elements of memory "
             "traffic not moved and an N·d buffer not allocated (in training it would be kept "
             "alive for the dW_in of the backward; here dW_in reads the tokens through the table "
             "too). Not saved: the expert output [N, d] is still written by the second GEMM and "
             "read by the combine (ScatterMoE writes it too, then sums the k routes).",
             "", "| d_model | d_ff | E | k | tokens/expert | tokens S | permuted copy not "
                 "allocated | traffic not moved | share of the layer's minimum bytes |",
             "|---|---|---|---|---|---|---|---|---|"]
    k = grid.k
    for d_model, d_ff in grid.shapes:
        for num_experts in grid.experts:
            for m in grid.tokens_per_expert:
                num_tokens = max(1, m * num_experts // k)
                routes = num_tokens * k
                copy = routes * d_model * bytes_per_element
                traffic = (num_tokens + routes) * d_model * bytes_per_element
                # minimum bytes of the layer: touched SwiGLU expert weights + tokens in and out
                touched = min(num_experts, routes)
                minimum = (touched * 3 * d_model * d_ff + 2 * num_tokens * d_model) \
                    * bytes_per_element
                lines.append(f"| {d_model} | {d_ff} | {num_experts} | {k} | {m} | {num_tokens} |"
                             f" {copy / 1e6:.1f} MB | {traffic / 1e6:.1f} MB | "
                             f"{100 * traffic / minimum:.1f}% |")
    return lines + [""]


# --------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, float32, CPU under TRITON_INTERPRET=1 (a smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="RESULTS.md to update")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    if args.dry_run:
        if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run on a CPU needs TRITON_INTERPRET=1 in the environment")
        device, dtype, grid = ("cuda" if gpu else "cpu"), torch.float32, DRY_GRID
    elif not gpu:
        print("bench_kernels.py needs a CUDA GPU; no GPU here. For a smoke test run "
              "TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --dry-run", file=sys.stderr)
        return 2
    else:
        device, dtype, grid = "cuda", torch.bfloat16, GPU_GRID
    torch.manual_seed(0)
    bench = timer(device)
    started = time.perf_counter()
    failures: list[str] = []

    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor()
                                                                   or platform.machine())
    header = [f"## Triton kernels (`python benchmarks/bench_kernels.py"
              f"{' --dry-run' if args.dry_run else ''}`)", "",
              f"{datetime.date.today()}, {name}, torch {torch.__version__}, triton "
              f"{triton.__version__}, {str(dtype).removeprefix('torch.')}.", ""]
    if args.dry_run:
        header += ["**Dry run**: tiny shapes on the Triton interpreter; the timings below only "
                   "show that the script runs and mean nothing about speed.", ""]
    bytes_lines = bytes_section(GPU_GRID, 2)  # the shapes in bf16, whatever the run
    if args.dry_run and args.out is not None:
        body = ["## Triton kernels (`benchmarks/bench_kernels.py`)", "",
                f"{datetime.date.today()}: no GPU numbers from this run. The script ran as "
                "`--dry-run` (CPU, Triton interpreter), whose timings mean nothing. Run "
                "`python benchmarks/bench_kernels.py --out benchmarks/RESULTS.md` on a CUDA "
                "GPU (about 5 minutes) to fill this section with the ceilings, the grouped "
                "FFN's % of the matmul ceiling, decode % of copy bandwidth, gating/permute "
                "times and the einsum/index/triton layer table.", "", *bytes_lines]
    mm_tflops, copy_gbps, lines = ceilings(grid, dtype, device, bench)
    print("\n".join(header + lines), flush=True)
    sections = [
        ("grouped FFN", partial(grouped_ffn_section, grid, dtype, device, bench, mm_tflops,
                                copy_gbps)),
        ("gating and permute", partial(gating_permute_section, grid, dtype, device, bench)),
        ("MoE layer", partial(layer_section, grid, dtype, device, bench)),
        ("tile sweep", partial(sweep_section, grid, dtype, device, bench)),
    ]
    for title, section in sections:
        # One failing section (a compile error on a new GPU, memory) must not cost the others
        # their numbers: record the error in the table and go on.
        try:
            part = section()
        except Exception as error:  # noqa: BLE001 - reported in the results, then re-raised
            part = [f"## {title}: FAILED", "", "```", *traceback.format_exception(error)[-6:],
                    "```", ""]
            failures.append(title)
        lines += part
        print("\n".join(part), flush=True)
        if args.out is not None and not args.dry_run:  # partial results survive a time-out
            write_section(args.out, START, END, "\n".join([*header, *lines]))
    lines += bytes_lines
    lines.append(f"Total time: {time.perf_counter() - started:.0f} s.")
    print("\n".join(bytes_lines + lines[-1:]))

    if args.out is not None:
        write_section(args.out, START, END, "\n".join(body if args.dry_run else header + lines))
        print(f"\nwrote {args.out}")
    if failures:
        print(f"FAILED sections: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
