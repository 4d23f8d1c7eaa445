"""Optimizer memory per GaLore preset, and the step-time overhead of the low-rank optimizers.

    python bench/optimizer_memory.py [--steps-model configs/transformer/tiny.yaml] [--gap 50]

1. For each `configs/galore/llama_*.yaml`: weights + optimizer state, counted in bf16 as the
   GaLore paper counts them (2 bytes per stored element, int32 bookkeeping at 4 bytes, decimal
   GB), for AdamW, GaLore (the preset) and APOLLO (same rank), beside the paper's Table 2.
   GaLore projects the attention and MLP matrices (the official module selection); "GaLore
   all" also projects the embedding and the LM head (`optim.lowrank_params`), which is the
   counting that matches the paper's 1B figure (4.37 vs 4.38 GB).
   Shapes come from `jax.eval_shape`: nothing is allocated. Also the compiled temporary memory
   of the GaLore update (XLA's memory analysis, nothing run) with all-at-once and staggered
   refresh: the staggered one SVDs one matrix at a time and adds no full-size buffer.
2. Step time of the full jitted train step for a small model on this CPU, AdamW vs GaLore vs
   APOLLO, in one process, interleaved step by step, averaged over whole refresh periods (the
   SVD amortised); also the median step (no refresh) and the refresh cost per period.
Prints a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from menagerie import arch
from menagerie.train import mesh as mesh_lib
from menagerie.train.config import load_config
from menagerie.train.optim import OptimConfig, make_optimizer
from menagerie.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
# GaLore paper Table 2: weights + optimizer state in BF16 (GB).
# Every matrix projected: attention and MLP kernels (scanned blocks), the embedding, the LM head.
ALL_MATRICES = ["blocks/(mixer|ffn)/", "^embed/", "^head/"]
PAPER = {"60m": (0.36, 0.24), "130m": (0.76, 0.52), "350m": (2.06, 1.22), "1b": (7.80, 4.38)}


def abstract_model(cfg):
    model_cfg = cfg.model.with_vocab(cfg.model.vocab_size or 256)
    model = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, mesh_lib.logical_names(state), nnx.to_pure_dict(state)


def bf16_bytes(tree) -> int:
    """Bytes with every float leaf counted at 2 bytes per element (the paper's convention)."""
    total = 0
    for x in jax.tree.leaves(tree):
        size = math.prod(x.shape)
        total += size * (2 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype.itemsize)
    return total


def optimizer_cfg(cfg, name: str, **extra):
    """The run's optimizer section as optimizer `name` (the fields that optimizer has)."""
    member = OptimConfig.choices[name]
    shared = {k: v for k, v in cfg.optim.model_dump().items() if k in member.model_fields}
    return member.model_validate({**shared, "name": name, **extra})


def memory_rows(presets: list[Path], compile_temp: bool) -> list[dict]:
    rows = []
    for path in presets:
        cfg = load_config(path)
        key = path.stem.split("_")[-1]
        _, names, params = abstract_model(cfg)
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        row = {
            "preset": path.stem,
            "params": n_params,
            "rank": cfg.optim.rank,
            "weights_gb": bf16_bytes(params) / 1e9,
        }
        for name in ("adamw", "galore", "apollo"):
            tx, _ = make_optimizer(optimizer_cfg(cfg, name), cfg.train.steps, names)
            state = jax.eval_shape(tx.init, params)
            row[f"{name}_state_gb"] = bf16_bytes(state) / 1e9
            row[f"{name}_total_gb"] = row["weights_gb"] + row[f"{name}_state_gb"]
        all_tx, _ = make_optimizer(
            optimizer_cfg(cfg, "galore", lowrank_params=ALL_MATRICES), cfg.train.steps, names
        )
        row["galore_all_total_gb"] = (
            row["weights_gb"] + bf16_bytes(jax.eval_shape(all_tx.init, params)) / 1e9
        )
        stag_tx, _ = make_optimizer(
            optimizer_cfg(cfg, "galore", stagger_refresh=True), cfg.train.steps, names
        )
        row["galore_stagger_state_gb"] = bf16_bytes(jax.eval_shape(stag_tx.init, params)) / 1e9
        if compile_temp and n_params < 2e8:  # XLA:CPU compiles big stacked SVDs slowly
            for label, stagger in (("uniform", False), ("stagger", True)):
                tx, _ = make_optimizer(
                    optimizer_cfg(cfg, "galore", stagger_refresh=stagger), cfg.train.steps, names
                )
                state = jax.eval_shape(tx.init, params)
                compiled = jax.jit(tx.update).lower(params, state, params).compile()
                mem = compiled.memory_analysis()
                row[f"update_temp_mb_{label}"] = (mem.temp_size_in_bytes / 1e6) if mem else None
        row["paper_adamw_gb"], row["paper_galore_gb"] = PAPER.get(key, (None, None))
        rows.append(row)
    return rows


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
    }


VARIANTS = ("adamw", "galore", "galore_qr", "galore_stagger", "galore_gram", "apollo")


def step_times(model_path: Path, gap: int, rank: int, periods: int) -> dict:
    """Per-step wall time of the jitted, donated train step for every variant, the variants
    interleaved step by step in one process (so load from elsewhere hits all alike). Step 0
    compiles and refreshes every matrix; steps 1..T·periods are timed: each T of them holds one
    refresh of every matrix (all-at-once: at step T; staggered: matrix j at ⌊jT/J⌋ and T).
    Per variant: `_ms` the mean (the headline: the refresh amortised), `_step_ms` the median
    step (one without refresh, for all-at-once), `_refresh_ms` the time per period above T
    median steps (the SVDs)."""
    cfg = load_config(model_path)
    graphdef, names, _ = abstract_model(cfg)
    vocab = cfg.model.vocab_size or 256
    model_cfg = cfg.model.with_vocab(vocab)
    batch = synthetic_batch(cfg.train.batch_size, cfg.train.seq_len, 256, 0)
    out = {"model": str(model_path.relative_to(ROOT)), "gap": gap, "rank": rank}
    lowrank = dict(rank=rank, update_proj_gap=gap)
    configs = {
        "adamw": optimizer_cfg(cfg, "adamw"),
        "galore": optimizer_cfg(cfg, "galore", **lowrank),
        "galore_qr": optimizer_cfg(cfg, "galore", svd_method="qr", **lowrank),
        "galore_stagger": optimizer_cfg(cfg, "galore", stagger_refresh=True, **lowrank),
        "galore_gram": optimizer_cfg(cfg, "galore", svd_method="gram", **lowrank),
        "apollo": optimizer_cfg(cfg, "apollo", **lowrank),
    }
    steps, states = {}, {}
    for label, ocfg in configs.items():
        tx, schedule = make_optimizer(ocfg, 10_000, names)
        params = nnx.to_pure_dict(nnx.split(arch.build(model_cfg, rngs=nnx.Rngs(0)))[1])
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "bad_steps": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }
        step = jax.jit(
            make_train_step(graphdef, tx, schedule, microbatches=1, z_loss=0.0, clip_norm=1.0),
            donate_argnums=0,
        )
        state, _ = step(state, batch)  # compile, step 0
        steps[label], states[label] = step, jax.block_until_ready(state)
    times = {label: np.zeros(gap * periods) for label in configs}
    for i in range(gap * periods):
        for label, step in steps.items():
            t0 = time.perf_counter()
            states[label] = jax.block_until_ready(step(states[label], batch)[0])
            times[label][i] = time.perf_counter() - t0
    for label, t in times.items():
        t = 1e3 * t.reshape(periods, gap)
        out[f"{label}_ms"] = float(t.mean())
        out[f"{label}_step_ms"] = float(np.median(t))
        out[f"{label}_refresh_ms"] = float(np.mean(t.sum(1) - gap * np.median(t)))
    for label in VARIANTS[1:]:
        out[f"{label}_overhead"] = out[f"{label}_ms"] / out["adamw_ms"] - 1
        out[f"{label}_step_overhead"] = out[f"{label}_step_ms"] / out["adamw_step_ms"] - 1
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-model", default=str(ROOT / "configs/transformer/tiny.yaml"))
    ap.add_argument("--gap", type=int, default=50, help="refresh gap T for the timing")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--periods", type=int, default=1)
    ap.add_argument(
        "--no-compile-temp",
        action="store_true",
        help="skip compiling the update for XLA's temp-memory figure",
    )
    args = ap.parse_args(argv)

    presets = sorted(
        (ROOT / "configs/galore").glob("llama_*.yaml"),
        key=lambda p: float(p.stem.split("_")[-1][:-1]) * (1000 if p.stem.endswith("b") else 1),
    )
    rows = memory_rows(presets, compile_temp=not args.no_compile_temp)
    print("weights + optimizer state, bf16, GB (paper: GaLore Table 2)")
    hdr = (
        f"{'preset':<12}{'params':>8}{'rank':>6}{'AdamW':>8}{'paper':>7}{'GaLore':>8}"
        f"{'paper':>7}{'GaLore all':>11}{'APOLLO':>8}{'upd tmp MB all/stagger':>24}"
    )
    print(hdr)
    for r in rows:
        tmp = (
            f"{r.get('update_temp_mb_uniform') or float('nan'):>10.1f} /"
            f"{r.get('update_temp_mb_stagger') or float('nan'):>9.1f}"
        )
        print(
            f"{r['preset']:<12}{r['params'] / 1e6:>7.0f}M{r['rank']:>6}"
            f"{r['adamw_total_gb']:>8.2f}{r['paper_adamw_gb']:>7.2f}"
            f"{r['galore_total_gb']:>8.2f}{r['paper_galore_gb']:>7.2f}"
            f"{r['galore_all_total_gb']:>11.2f}{r['apollo_total_gb']:>8.2f}{tmp:>24}"
        )
    timing = step_times(Path(args.steps_model).resolve(), args.gap, args.rank, args.periods)
    print(
        f"\nstep time, {timing['model']}, CPU ({jax.device_count()} device), averaged over "
        f"{args.periods} refresh period(s) of T={args.gap}, rank {args.rank}"
    )
    print(
        f"  {'':<16}{'mean':>10}{'vs AdamW':>10}{'median step':>13}{'vs AdamW':>10}"
        f"{'refresh/period':>16}"
    )
    for label in VARIANTS:
        t = timing
        over = "" if label == "adamw" else f"{t[label + '_overhead']:+.1%}"
        step_over = "" if label == "adamw" else f"{t[label + '_step_overhead']:+.1%}"
        print(
            f"  {label:<16}{t[label + '_ms']:7.1f} ms{over:>10}{t[label + '_step_ms']:10.1f} ms"
            f"{step_over:>10}{t[label + '_refresh_ms']:13.0f} ms"
        )
    print(json.dumps({"bench": "optimizer_memory", "memory": rows, "step_time": timing}))


if __name__ == "__main__":
    sys.exit(main())
