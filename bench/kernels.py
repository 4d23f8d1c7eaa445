"""Benchmark of the attention kernels: time, TFLOP/s and % of the measured bf16 matmul peak.

    python bench/kernels.py            # GPU: Megalodon-7B and Llama shapes; CPU: tiny smoke shapes
    python bench/kernels.py --small    # tiny shapes anywhere

Each op runs for every backend available here: our Pallas kernel (compiled on GPU, interpreted on
CPU), the XLA reference (`impl="reference"`), and `jax.nn.dot_product_attention` (cuDNN on GPU,
run per chunk for chunked attention). FLOPs count the visible (query, key) pairs P only:
forward 2 P (Dqk + Dv), backward 2.5x forward (FlashAttention's convention). The matmul peak is
measured in the same process. Prints a table, the target ratios, and one final JSON line. A
config that fails prints an error row; the run never stops early except at the time budget.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from menagerie.kernels import (
    BlockSizes,
    chunked_attention,
    masks,
    platform,
    sparse_attention,
)
from menagerie.kernels.masks import block_tables

# Tried in order when the default tiles fail to compile (e.g. shared memory exceeded).
FALLBACK_BLOCKS = (
    BlockSizes(q=32, k=32, q_bwd=32, k_bwd=32, dv=128, num_stages=1),
    BlockSizes(q=16, k=16, q_bwd=16, k_bwd=16, dv=64, num_stages=1),
)


def timeit(fn, *args, iters: int) -> tuple[float, float]:
    """(first call incl. compile, median of `iters` timed calls) in seconds."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def matmul_peak(n: int, iters: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    _, t = timeit(f, a, a, iters=iters)
    return 2 * n**3 / t


def fwd_and_grad(attn):
    """(forward, forward+backward) jitted callables of attn(q, k, v)."""
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q, k, v):
        o, vjp = jax.vjp(attn, q, k, v)
        return vjp(jnp.ones_like(o))

    return fwd, fwd_bwd


def dpa_per_chunk(chunk, implementation):
    """jax.nn.dot_product_attention on [B * n_chunks, chunk, H, D] (T % chunk == 0)."""

    def attn(q, k, v):
        b, t = q.shape[:2]

        def split(x):
            return x.reshape(b * (t // chunk), chunk, *x.shape[2:])

        o = jax.nn.dot_product_attention(
            split(q), split(k), split(v), is_causal=True, implementation=implementation
        )
        return o.reshape(b, t, *o.shape[2:])

    return attn


def configs(small: bool, on_gpu: bool):
    """(op, shape name, (B, T, Hq, Hkv, Dqk, Dv), mask, impls); mask is the visible-pair rule."""
    kernel = "pallas" if on_gpu else "interpret"
    xla_dpa = "cudnn" if on_gpu else "xla-dpa"
    out = []
    if small:
        shapes = [
            ("llama-tiny", (1, 256, 2, 2, 64, 64), 128),
            ("megalodon-tiny", (1, 256, 1, 1, 64, 256), 128),
        ]
        for name, shape, chunk in shapes:
            impls = [kernel, "reference"] + (
                [xla_dpa + "-per-chunk"] if shape[4] == shape[5] else []
            )
            out.append(("chunked", name, shape, masks.Chunked(chunk), impls))
        t = 256
        out.append(
            (
                "sparse",
                "llama-tiny-25%",
                (1, t, 2, 2, 64, 64),
                masks.Causal() & masks.LocalWindow(t // 4, 0),
                [kernel, "reference"],
            )
        )
        out.append(("sparse", "llama-tiny-dense", (1, t, 2, 2, 64, 64), masks.Full(), [kernel]))
        return out
    for chunk in (2048, 4096):  # Megalodon-7B: 4 heads, Z/H = 256, E/H = 2048
        out.append(
            (
                "chunked",
                f"megalodon7b-c{chunk}",
                (1, 8192, 4, 4, 256, 2048),
                masks.Chunked(chunk),
                [kernel, "reference"],
            )
        )
    for chunk in (2048, 4096):  # Llama-style heads: 32 heads of 128
        out.append(
            (
                "chunked",
                f"llama-d128-c{chunk}",
                (1, 8192, 32, 8, 128, 128),
                masks.Chunked(chunk),
                [kernel, "cudnn-per-chunk"],  # XLA reference skipped: 30 s compile each
            )
        )
    t = 8192
    # 25% block density: a causal band of T/4 keys. The dense run gives the scaling baseline.
    out.append(
        (
            "sparse",
            "llama-d128-band25%",
            (1, t, 16, 16, 128, 128),
            masks.Causal() & masks.LocalWindow(t // 4, 0),
            [kernel],
        )
    )
    out.append(
        ("sparse", "llama-d128-dense", (1, t, 16, 16, 128, 128), masks.Full(), [kernel, xla_dpa])
    )
    return out


def visible_pairs(mask, t: int) -> int:
    if isinstance(mask, masks.Chunked):
        full, rem = divmod(t, mask.chunk_size)
        per = (lambda c: c * (c + 1) // 2) if mask.causal else (lambda c: c * c)
        return full * per(mask.chunk_size) + per(rem)
    return int(mask.dense(t, t).sum())


def make_attn(op, impl, mask, blocks=None):
    if impl in ("cudnn", "xla-dpa"):
        if not isinstance(mask, masks.Full):
            raise ValueError("dense dot_product_attention only for the Full mask")
        kind = "cudnn" if impl == "cudnn" else "xla"
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=kind)
    if impl.endswith("-per-chunk"):
        return dpa_per_chunk(mask.chunk_size, "cudnn" if impl.startswith("cudnn") else "xla")
    if op == "chunked":
        return functools.partial(
            chunked_attention,
            chunk_size=mask.chunk_size,
            causal=mask.causal,
            impl=impl,
            block_sizes=blocks,
        )
    return functools.partial(sparse_attention, mask=mask, impl=impl, block_sizes=blocks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting configs after")
    parser.add_argument("--filter", default="", help="only shapes whose name contains this")
    args = parser.parse_args(argv)
    plat = platform()
    on_gpu = plat == "gpu"
    small = args.small or not on_gpu
    iters = args.iters or (5 if on_gpu else 2)
    start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}  device {dev.device_kind} ({plat})  small={small}", flush=True)
    peak = matmul_peak(1024 if small else 8192, iters=3 if small else 10)
    print(f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s", flush=True)

    results = {}
    header = (
        f"{'op':8} {'shape':22} {'impl':16} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'TFLOP/s':>8} {'%peak':>6} {'compile s':>9}"
    )
    print(header, flush=True)
    for op, name, (b, t, hq, hkv, dqk, dv), mask, impls in configs(small, on_gpu):
        if args.filter not in name:
            continue
        pairs = visible_pairs(mask, t)
        flops_fwd = 2.0 * b * hq * pairs * (dqk + dv)
        for impl in impls:
            if time.perf_counter() - start > args.budget_s:
                print(f"{op:8} {name:22} {impl:16} skipped: time budget", flush=True)
                continue
            key = f"{op}/{name}/{impl}"
            try:
                kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
                q = jax.random.normal(kq, (b, t, hq, dqk), jnp.bfloat16)
                k = jax.random.normal(kk, (b, t, hkv, dqk), jnp.bfloat16)
                v = jax.random.normal(kv, (b, t, hkv, dv), jnp.bfloat16)
                ladder = (None, *FALLBACK_BLOCKS) if impl in ("pallas", "interpret") else (None,)
                for n_try, blocks in enumerate(ladder):
                    try:
                        fwd, fwd_bwd = fwd_and_grad(make_attn(op, impl, mask, blocks))
                        c1, t_f = timeit(fwd, q, k, v, iters=iters)
                        c2, t_fb = timeit(fwd_bwd, q, k, v, iters=iters)
                        break
                    except Exception as e:  # noqa: BLE001
                        if n_try == len(ladder) - 1:
                            raise
                        print(
                            f"  ({impl} tiles {blocks or 'default'} failed: "
                            f"{str(e).splitlines()[0][:90]}; trying smaller)",
                            flush=True,
                        )
                        jax.clear_caches()
                tflops = 3.5 * flops_fwd / t_fb
                results[key] = dict(
                    fwd_ms=t_f * 1e3,
                    fwd_bwd_ms=t_fb * 1e3,
                    tflops=tflops / 1e12,
                    pct_peak=100 * tflops / peak,
                )
                print(
                    f"{op:8} {name:22} {impl:16} {t_f * 1e3:9.2f} {t_fb * 1e3:11.2f} "
                    f"{tflops / 1e12:8.1f} {100 * tflops / peak:6.1f} {c1 + c2:9.1f}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 (one failing config prints a row, not a crash)
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:150]
                results[key] = dict(error=msg)
                print(f"{op:8} {name:22} {impl:16} ERROR {msg}", flush=True)
                if "--debug" in sys.argv:
                    traceback.print_exc()
            finally:
                jax.clear_caches()

    kernel = "pallas" if on_gpu else "interpret"
    ratios = {}

    def ratio(label, num_key, den_key, scale=1.0):
        num, den = results.get(num_key, {}), results.get(den_key, {})
        if "fwd_bwd_ms" in num and "fwd_bwd_ms" in den:
            ratios[label] = den["fwd_bwd_ms"] * scale / num["fwd_bwd_ms"]

    for op, name, *_ in configs(small, on_gpu):
        ratio(
            f"{name}: speedup vs XLA reference (target >= 2 at Megalodon)",
            f"{op}/{name}/{kernel}",
            f"{op}/{name}/reference",
        )
        for dpa in ("cudnn-per-chunk", "xla-dpa-per-chunk"):
            ratio(
                f"{name}: speedup vs {dpa} (target >= 1.0 for cuDNN at d=128)",
                f"{op}/{name}/{kernel}",
                f"{op}/{name}/{dpa}",
            )
    sparse = [c for c in configs(small, on_gpu) if c[0] == "sparse"]
    if len(sparse) == 2:
        (_, sname, (_, t, *_), smask, _), (_, dname, *_) = sparse
        kinds = smask.block_kinds(t, t, 64, 64)
        density = block_tables(kinds).density
        ratio(
            f"{sname}: (dense time x density {density:.3f}) / sparse time (target >= 0.8)",
            f"sparse/{sname}/{kernel}",
            f"sparse/{dname}/{kernel}",
            scale=density,
        )
    print("\ntarget ratios (fwd+bwd time; > 1 means ours is faster):")
    for label, r in ratios.items():
        print(f"  {r:6.2f}  {label}")
    print(
        json.dumps(
            dict(
                bench="kernels",
                jax=jax.__version__,
                device=dev.device_kind,
                peak_tflops=peak / 1e12,
                results=results,
                ratios=ratios,
                wall_s=time.perf_counter() - start,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
