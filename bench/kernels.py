"""Benchmark of the attention kernels: time, TFLOP/s and % of the measured bf16 matmul peak.

    python bench/kernels.py            # GPU: Megalodon-7B and Llama shapes; CPU: tiny smoke shapes
    python bench/kernels.py --small    # tiny shapes anywhere
    python bench/kernels.py --tune     # sweep the Pallas tile sizes, then time the best

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


def mgpu_per_chunk(chunk):
    """JAX's own Mosaic GPU (Hopper, FA3-style) flash attention, per chunk: a peer data point
    for what a Mosaic GPU kernel reaches here. Its API is private and moves between versions."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu

    cfg = mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2, causal=True)

    def attn(q, k, v):  # its kernels are float16 only
        q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
        b, t = q.shape[:2]

        def split(x):
            return x.reshape(b * (t // chunk), chunk, *x.shape[2:])

        o = mgpu.attention(split(q), split(k), split(v), cfg)
        return o.reshape(b, t, *o.shape[2:])

    return attn


def configs(small: bool, plat: str):
    """(op, shape name, (B, T, Hq, Hkv, Dqk, Dv), mask, impls); mask is the visible-pair rule."""
    kernel = "interpret" if plat == "cpu" else "pallas"  # TPU: splash attention
    xla_dpa = "cudnn" if plat == "gpu" else "xla-dpa"
    out = []
    if small:
        shapes = [
            ("llama-tiny", (1, 256, 2, 2, 64, 64), 128),
            ("megalodon-tiny", (1, 256, 1, 1, 64, 256), 128),
        ]
        for name, shape, chunk in shapes:
            impls = [kernel, *(["interpret_tpu"] if plat == "cpu" else []), "reference"] + (
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
                [kernel, f"{xla_dpa}-per-chunk"],  # XLA reference skipped: 30 s compile each
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
    if impl == "mgpu-per-chunk":
        return mgpu_per_chunk(mask.chunk_size)
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


# --------------------------------------------------------------------------- tile sweep (--tune)
# Candidates are tried forward first (forward time only), then backward with the best forward
# (forward+backward time); each list starts with the current default.
_B = BlockSizes


def tune_candidates(small: bool, megalodon: bool):
    """(forward candidates, backward candidates) as BlockSizes keyword dicts."""
    if small:
        fwd = [dict(q=16, k=16, dv=32), dict(q=32, k=16, dv=64)]
        bwd = [dict(), dict(q_bwd=16, k_bwd=32, q_dq=32, k_dq=16, dv_bwd=64)]
        return fwd, bwd
    if megalodon:  # round 2 on H100: the round-1 winner first (now the default), neighbours
        fwd = [
            dict(q=128, k=64, dv=256, num_warps=8, num_stages=2),
            dict(q=128, k=64, dv=256, num_warps=8, num_stages=3),
            dict(q=128, k=64, dv=128, num_warps=8, num_stages=2),
            dict(q=128, k=64, dv=512, num_warps=8, num_stages=2),
            dict(q=128, k=32, dv=512, num_warps=8, num_stages=2),
            dict(q=128, k=64, dv=256, num_warps=4, num_stages=2),
        ]
        bwd = [
            dict(q_bwd=64, k_bwd=64, num_warps_bwd=4, num_stages_bwd=2),
            dict(q_bwd=64, k_bwd=64, num_warps_bwd=8, num_stages_bwd=2),
            dict(q_bwd=64, k_bwd=64, num_warps_bwd=8, num_stages_bwd=3),
            dict(q_bwd=64, k_bwd=128, q_dq=128, k_dq=64, num_warps_bwd=8, num_stages_bwd=2),
            dict(q_bwd=64, k_bwd=64, dv_bwd=128, num_warps_bwd=8, num_stages_bwd=2),
            dict(q_bwd=64, k_bwd=64, dv_bwd=512, num_warps_bwd=8, num_stages_bwd=2),
            dict(q_bwd=64, k_bwd=64, q_dq=128, k_dq=32, num_warps_bwd=8, num_stages_bwd=2),
        ]
        return fwd, bwd
    fwd = [
        dict(q=128, k=128, num_warps=8, num_stages=3),
        dict(q=128, k=64, num_warps=8, num_stages=3),
        dict(q=128, k=64, num_warps=8, num_stages=4),
        dict(q=128, k=64, num_warps=4, num_stages=3),
        dict(q=256, k=64, num_warps=8, num_stages=3),
        dict(q=128, k=32, num_warps=8, num_stages=4),
    ]
    # Backward: the default (whose dK/dV kernel now sums the 4 query heads of a kv head in one
    # program, gqa_split 1 at this shape), the same tiles with one program per query head (the
    # previous kernel's layout), FlashAttention-2's Triton tutorial tiles (dK/dV: 128 keys per
    # program, 32 queries per step; dQ: 128 queries, 32 keys), and neighbours.
    bwd = [
        dict(q_bwd=64, k_bwd=64, num_warps_bwd=4, num_stages_bwd=2),
        dict(q_bwd=64, k_bwd=64, num_warps_bwd=4, num_stages_bwd=2, gqa_split=4),
        dict(q_bwd=32, k_bwd=128, q_dq=128, k_dq=32, num_warps_bwd=4, num_stages_bwd=3),
        dict(q_bwd=32, k_bwd=128, q_dq=128, k_dq=32, num_warps_bwd=8, num_stages_bwd=2),
        dict(q_bwd=64, k_bwd=128, q_dq=128, k_dq=64, num_warps_bwd=8, num_stages_bwd=2),
        dict(q_bwd=64, k_bwd=64, num_warps_bwd=4, num_stages_bwd=3),
        dict(q_bwd=64, k_bwd=64, q_dq=128, k_dq=64, num_warps_bwd=4, num_stages_bwd=2),
        dict(q_bwd=32, k_bwd=64, num_warps_bwd=4, num_stages_bwd=2),
    ]
    return fwd, bwd


def tune_shapes(small: bool, on_gpu: bool):
    """(name, (B, T, Hq, Hkv, Dqk, Dv), tuning chunk, check chunk, baseline impl)."""
    if small:
        return [
            ("llama-tiny", (1, 128, 2, 2, 32, 32), 64, 128, "xla-dpa-per-chunk"),
            ("megalodon-tiny", (1, 128, 1, 1, 32, 128), 64, 128, "reference"),
        ]
    dpa = "cudnn-per-chunk" if on_gpu else "xla-dpa-per-chunk"
    return [
        ("llama-d128", (1, 8192, 32, 8, 128, 128), 2048, 4096, dpa),
        ("megalodon7b", (1, 8192, 4, 4, 256, 2048), 2048, 4096, "reference"),
    ]


def tune(small: bool, on_gpu: bool, iters: int, budget_s: float, peak: float, name_filter: str):
    kernel = "pallas" if on_gpu else "interpret"
    start = time.perf_counter()
    out = {}

    def inputs(b, t, hq, hkv, dqk, dv):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
        return (
            jax.random.normal(kq, (b, t, hq, dqk), jnp.bfloat16),
            jax.random.normal(kk, (b, t, hkv, dqk), jnp.bfloat16),
            jax.random.normal(kv, (b, t, hkv, dv), jnp.bfloat16),
        )

    def run(impl, chunk, blocks, qkv, fwd_only):
        fwd, fwd_bwd = fwd_and_grad(make_attn("chunked", impl, masks.Chunked(chunk), blocks))
        try:
            return timeit(fwd if fwd_only else fwd_bwd, *qkv, iters=iters)[1]
        finally:
            jax.clear_caches()

    shapes = [x for x in tune_shapes(small, on_gpu) if name_filter in x[0]]
    deadline = start

    def trial(label, impl, chunk, blocks, qkv, fwd_only, force=False):
        if not force and time.perf_counter() > deadline:
            print(f"  {label:58} skipped: time budget", flush=True)
            return None
        try:
            t = run(impl, chunk, blocks, qkv, fwd_only)
        except Exception as e:  # noqa: BLE001 (e.g. shared memory exceeded: a row, not a crash)
            print(f"  {label:58} ERROR {str(e).splitlines()[0][:100]}", flush=True)
            return None
        print(f"  {label:58} {'fwd' if fwd_only else 'fwd+bwd'} {t * 1e3:9.3f} ms", flush=True)
        return t

    for n_done, (name, (b, t, hq, hkv, dqk, dv), chunk, check_chunk, base) in enumerate(shapes):
        # Each shape's sweep gets an equal share of what is left; the final checks always run.
        deadline = time.perf_counter() + (start + budget_s - time.perf_counter()) / (
            len(shapes) - n_done
        )
        print(f"\n== tune {name} (B={b} T={t} Hq={hq} Hkv={hkv} Dqk={dqk} Dv={dv}), chunk {chunk}")
        qkv = inputs(b, t, hq, hkv, dqk, dv)
        fwd_c, bwd_c = tune_candidates(small, megalodon=dv > dqk)
        fwd_t = [
            (trial(f"fwd {c}", kernel, chunk, _B(**c), qkv, True, force=i == 0), c)
            for i, c in enumerate(fwd_c)
        ]
        fwd_ok = [(x, c) for x, c in fwd_t if x is not None]
        if not fwd_ok:
            out[name] = dict(error="no forward candidate ran")
            continue
        best_fwd = min(fwd_ok, key=lambda xc: xc[0])[1]
        bwd_t = [
            (trial(f"bwd {c}", kernel, chunk, _B(**best_fwd, **c), qkv, False, force=i == 0), c)
            for i, c in enumerate(bwd_c)
        ]
        bwd_ok = [(x, c) for x, c in bwd_t if x is not None]
        best_bwd = min(bwd_ok, key=lambda xc: xc[0])[1] if bwd_ok else {}
        best = {**best_fwd, **best_bwd}
        res = dict(best=best, fwd_default_ms=None if fwd_t[0][0] is None else fwd_t[0][0] * 1e3)
        if bwd_t and bwd_t[0][0] is not None:
            res["fwd_bwd_default_bwd_ms"] = bwd_t[0][0] * 1e3
        for c in (chunk, check_chunk):
            ours = trial(f"best, chunk {c}", kernel, c, _B(**best), qkv, False, force=True)
            theirs = trial(f"{base}, chunk {c}", base, c, None, qkv, False, force=True)
            if on_gpu and dv == dqk:  # peer: JAX's Mosaic GPU kernel (dense causal per chunk)
                peer = trial(
                    f"mgpu-per-chunk, chunk {c}", "mgpu-per-chunk", c, None, qkv, False, True
                )
                res[f"mgpu_c{c}_ms"] = None if peer is None else peer * 1e3
            pairs = b * hq * visible_pairs(masks.Chunked(c), t)
            flops = 3.5 * 2.0 * pairs * (dqk + dv)
            res[f"c{c}"] = dict(
                ours_ms=None if ours is None else ours * 1e3,
                base=base,
                base_ms=None if theirs is None else theirs * 1e3,
                ratio=None if not (ours and theirs) else theirs / ours,
                ours_pct_peak=None if not ours else 100 * flops / ours / peak,
            )
        out[name] = res
        print(f"  best for {name}: BlockSizes(**{best})")
        for c in (chunk, check_chunk):
            r = res[f"c{c}"]
            if r["ratio"] is not None:
                print(
                    f"  chunk {c}: ours {r['ours_ms']:.3f} ms ({r['ours_pct_peak']:.1f}% of peak), "
                    f"{base} {r['base_ms']:.3f} ms: {r['ratio']:.2f}x"
                )
    return out


def print_json(bench: str, dev, peak: float, start: float, **fields) -> None:
    """The final JSON line: what ran where, the measured peak, and the results."""
    head = dict(bench=bench, jax=jax.__version__, device=dev.device_kind)
    tail = dict(peak_tflops=peak / 1e12, **fields, wall_s=time.perf_counter() - start)
    print(json.dumps({**head, **tail}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (default on CPU)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting configs after")
    parser.add_argument("--filter", default="", help="only shapes whose name contains this")
    parser.add_argument("--tune", action="store_true", help="sweep Pallas tile sizes instead")
    args = parser.parse_args(argv)
    plat = platform()
    on_gpu = plat == "gpu"
    small = args.small or plat == "cpu"
    if args.tune and plat == "tpu":
        parser.error("--tune sweeps the GPU kernel's tiles; on TPU the kernel is splash attention")
    iters = args.iters or (5 if on_gpu else 2)
    start = time.perf_counter()
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}  device {dev.device_kind} ({plat})  small={small}", flush=True)
    peak = matmul_peak(1024 if small else 8192, iters=3 if small else 10)
    print(f"bf16 matmul peak measured: {peak / 1e12:.1f} TFLOP/s", flush=True)
    if args.tune:
        res = tune(small, on_gpu, iters, args.budget_s, peak, args.filter)
        print_json("kernels-tune", dev, peak, start, tune=res)
        return 0

    results = {}
    header = (
        f"{'op':8} {'shape':22} {'impl':16} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'TFLOP/s':>8} {'%peak':>6} {'compile s':>9}"
    )
    print(header, flush=True)
    for op, name, (b, t, hq, hkv, dqk, dv), mask, impls in configs(small, plat):
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

    kernel = "interpret" if plat == "cpu" else "pallas"
    ratios = {}

    def ratio(label, num_key, den_key, scale=1.0):
        num, den = results.get(num_key, {}), results.get(den_key, {})
        if "fwd_bwd_ms" in num and "fwd_bwd_ms" in den:
            ratios[label] = den["fwd_bwd_ms"] * scale / num["fwd_bwd_ms"]

    for op, name, *_ in configs(small, plat):
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
    sparse = [c for c in configs(small, plat) if c[0] == "sparse"]
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
    print_json("kernels", dev, peak, start, results=results, ratios=ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
