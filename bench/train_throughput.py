"""Training throughput and MFU of the real train step, beside a hand-written jnp peer step.

    python bench/train_throughput.py [--steps 8] [--sizes default,d512] [--peaks 4]

For each size: the trainer's own jitted, donated train step on real stdlib batches, and a peer:
a plain pure-jnp Llama train step (same dims, Python loop over layers, einsums, optax AdamW with
the same clipping, no flax), both compiled in this process. After compilation the two steps run
alternately, each step timed on its own, with the float32 matmul peak measured `--peaks` times
interleaved among them; the peak is the largest of those measurements (on GPU/TPU the device
table). The machine may be shared, so every row reports its best and median step and MFU from
each, both against that one peak; `ratio` is ours / peer (median step). The data pipeline is
timed alone on the same batch shape, as a multiple of what the step consumes.
Prints a table and one JSON line. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from menagerie.data import measure_throughput
from menagerie.train.config import load_config
from menagerie.train.metrics import device_peak_flops, measure_matmul_peak
from menagerie.train.trainer import Trainer

SIZES = {
    # name: overrides on top of the defaults
    "default": [],
    "d512": [
        "model.d_model=512",
        "model.n_layers=8",
        "model.mixer.n_heads=8",
        "train.seq_len=1024",
        "train.batch_size=4",
    ],
}


# ---- peer: a hand-written Llama train step --------------------------------------------------


def peer_init(key, *, vocab: int, d: int, layers: int, heads: int, ffn: int) -> dict:
    """Tied-embedding Llama parameters as a plain dict (per-layer lists, no stacking)."""
    hd = d // heads
    keys = iter(jax.random.split(key, 1 + 7 * layers))

    def normal(shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    blocks = [
        {
            "wq": normal((d, heads, hd)),
            "wk": normal((d, heads, hd)),
            "wv": normal((d, heads, hd)),
            "wo": normal((heads, hd, d)),
            "w_gate": normal((d, ffn)),
            "w_up": normal((d, ffn)),
            "w_down": normal((ffn, d)),
            "attn_norm": jnp.ones((d,)),
            "ffn_norm": jnp.ones((d,)),
        }
        for _ in range(layers)
    ]
    return {"embed": normal((vocab, d)), "blocks": blocks, "final_norm": jnp.ones((d,))}


def _rms(x, w, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x_BTHD, cos_TF, sin_TF):
    h = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :h], x_BTHD[..., h:]
    c, s = cos_TF[None, :, None], sin_TF[None, :, None]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def peer_loss(params: dict, tokens_BT, targets_BT):
    t = tokens_BT.shape[1]
    hd = params["blocks"][0]["wq"].shape[-1]
    inv = 10000.0 ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    mask = jnp.tril(jnp.ones((t, t), jnp.bool_))
    x = params["embed"][tokens_BT]
    for p in params["blocks"]:
        h = _rms(x, p["attn_norm"])
        q = _rope(jnp.einsum("btd,dhk->bthk", h, p["wq"]), cos, sin)
        k = _rope(jnp.einsum("btd,dhk->bthk", h, p["wk"]), cos, sin)
        v = jnp.einsum("btd,dhk->bthk", h, p["wv"])
        s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(hd)
        s = jnp.where(mask, s, -1e30)
        o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1), v)
        x = x + jnp.einsum("bthk,hkd->btd", o, p["wo"])
        h = _rms(x, p["ffn_norm"])
        g = jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])
        x = x + g @ p["w_down"]
    logits = _rms(x, params["final_norm"]) @ params["embed"].T
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz - tgt)


def make_peer(cfg, key):
    """(jitted donated step, initial state) of the peer at cfg's model dims."""
    m = cfg.model
    params = peer_init(
        key,
        vocab=m.padded_vocab,
        d=m.d_model,
        layers=m.n_layers,
        heads=m.mixer.n_heads,
        ffn=m.ffn.dim(m),
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(cfg.optim.lr, weight_decay=cfg.optim.weight_decay),
    )

    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(peer_loss)(params, batch["tokens"], batch["targets"])
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return jax.jit(step, donate_argnums=0), (params, opt.init(params))


# ---- timing ---------------------------------------------------------------------------------


def _timed(fn, state, batch):
    t0 = time.perf_counter()
    state, out = fn(state, batch)
    jax.block_until_ready((state, out))
    return state, out, time.perf_counter() - t0


def bench_size(
    name: str, overrides: list[str], steps: int, n_peaks: int, peak0: float, measured_peak: bool
) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [*overrides, f"run_dir={run_dir}", "log.tensorboard=false"])
        trainer = Trainer(cfg)
        cfg = trainer.cfg
        t = cfg.train
        state = trainer.init_state()
        step_fn = trainer.jit_train_step()
        peer_fn, peer_state = make_peer(cfg, jax.random.key(t.seed))
        it = trainer.train_data.batches(t.batch_size, seed=t.seed)
        batches = [trainer._global_batch(next(it)) for _ in range(steps + 2)]
        peer_batches = [{k: jnp.asarray(b[k]) for k in ("tokens", "targets")} for b in batches]
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        first: dict[str, float] = {}
        peaks = [peak0]
        peak_at = {round(i * steps / max(n_peaks, 1)) for i in range(n_peaks)}
        with trainer.context():
            for i, (b, pb) in enumerate(zip(batches, peer_batches, strict=True)):
                if measured_peak and i - 2 in peak_at:
                    peaks.append(measure_matmul_peak())
                state, _, dt = _timed(step_fn, state, b)
                peer_state, _, pdt = _timed(peer_fn, peer_state, pb)
                if i == 0:
                    first = {"ours": dt, "peer": pdt}
                elif i >= 2:  # steps 0, 1: compilation and one warm-up
                    times["ours"].append(dt)
                    times["peer"].append(pdt)
        peak = max(peaks)
        tokens = t.batch_size * t.seq_len
        fpt = cfg.model.flops_per_token(t.seq_len)
        n_dev = jax.device_count()
        data_tps = measure_throughput(
            trainer.train_data.folder, seq_len=t.seq_len, batch_size=t.batch_size, num_batches=100
        )["tokens_per_s"]
        rows = []
        for who, ts in times.items():
            best, med = min(ts), statistics.median(ts)
            rows.append(
                {
                    "size": name,
                    "step": who,
                    "params_M": cfg.model.num_params() / 1e6,
                    "d_model": cfg.model.d_model,
                    "layers": cfg.model.n_layers,
                    "seq_len": t.seq_len,
                    "batch": t.batch_size,
                    "first_step_s": first[who],
                    "step_s_best": best,
                    "step_s_median": med,
                    "step_s_all": ts,
                    "tokens_per_s": tokens / med,
                    "mfu_best": tokens / best * fpt / (peak * n_dev),
                    "mfu_median": tokens / med * fpt / (peak * n_dev),
                    "peak_flops": peak,
                    "peak_samples": peaks,
                    "data_tokens_per_s": data_tps,
                    "data_headroom": data_tps * med / tokens,
                }
            )
        rows[0]["vs_peer"] = rows[1]["step_s_median"] / rows[0]["step_s_median"]
        rows[1]["vs_peer"] = 1.0
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--peaks", type=int, default=4, help="peak measurements among the steps")
    args = ap.parse_args()
    peak, source = device_peak_flops()
    measured = source.startswith("measured")
    rows = [
        r
        for n in args.sizes.split(",")
        for r in bench_size(n, SIZES[n], args.steps, args.peaks, peak, measured)
    ]
    peak = max(r["peak_flops"] for r in rows)
    if measured:
        source = f"max of {len(rows[0]['peak_samples'])} float32 matmul runs interleaved w/ steps"
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"peak {peak / 1e9:.1f} GFLOP/s ({source})"
    )
    head = (
        f"{'size':8} {'step':5} {'params':>8} {'seq':>5} {'batch':>5} {'compile s':>9} "
        f"{'best ms':>8} {'med ms':>8} {'tok/s':>8} {'MFU best':>8} {'MFU med':>8} "
        f"{'vs peer':>7} {'data x':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['size']:8} {r['step']:5} {r['params_M']:7.2f}M {r['seq_len']:5d} "
            f"{r['batch']:5d} {r['first_step_s']:9.1f} {r['step_s_best'] * 1e3:8.1f} "
            f"{r['step_s_median'] * 1e3:8.1f} {r['tokens_per_s']:8.0f} "
            f"{100 * r['mfu_best']:7.1f}% {100 * r['mfu_median']:7.1f}% "
            f"{r['vs_peer']:6.2f}x {r['data_headroom']:6.0f}x"
        )
    print(
        "peak samples (GFLOP/s): "
        + "; ".join(
            f"{r['size']}: " + ", ".join(f"{p / 1e9:.0f}" for p in r["peak_samples"])
            for r in rows[::2]
        )
    )
    print(
        json.dumps(
            {"bench": "train_throughput", "peak_flops": peak, "peak_source": source, "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
