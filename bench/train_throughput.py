"""Training throughput and MFU of the real train step, and the data pipeline's headroom.

    python bench/train_throughput.py [--steps 8] [--sizes default,d512]

For each size: the trainer's own jitted, donated train step on real stdlib batches, timed after
compilation; MFU = analytic training FLOPs/s over the peak, where the peak is a float32 matmul
measured in this same process (CPU) or the device table (GPU/TPU). The data pipeline is timed
alone on the same batch shape and reported as a multiple of what the step consumes.
Prints a table and one JSON line. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax

from menagerie.data import measure_throughput
from menagerie.train.config import load_config
from menagerie.train.metrics import device_peak_flops
from menagerie.train.trainer import Trainer

SIZES = {
    # name: overrides on top of the defaults
    "default": [],
    "d512": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "train.seq_len=1024",
             "train.batch_size=4"],
}


def bench_size(name: str, overrides: list[str], steps: int, peak: float) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [*overrides, f"run_dir={run_dir}", "log.tensorboard=false"])
        trainer = Trainer(cfg)
        t = trainer.cfg.train
        state = trainer.init_state()
        step_fn = trainer.jit_train_step()
        it = trainer.train_data.batches(t.batch_size, seed=t.seed)
        batches = [trainer._global_batch(next(it)) for _ in range(steps + 2)]
        with trainer.context():
            t0 = time.perf_counter()
            state, m = step_fn(state, batches[0])
            jax.block_until_ready(m)
            compile_s = time.perf_counter() - t0
            state, m = step_fn(state, batches[1])  # one more warm-up
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for b in batches[2:]:
                state, m = step_fn(state, b)
            jax.block_until_ready((state, m))
            dt = (time.perf_counter() - t0) / steps
        tokens = t.batch_size * t.seq_len
        fpt = trainer.cfg.model.flops_per_token(t.seq_len)
        tps = tokens / dt
        data_tps = measure_throughput(trainer.train_data.folder, seq_len=t.seq_len,
                                      batch_size=t.batch_size, num_batches=100)["tokens_per_s"]
        return {
            "size": name,
            "params_M": trainer.cfg.model.num_params() / 1e6,
            "d_model": trainer.cfg.model.d_model,
            "layers": trainer.cfg.model.n_layers,
            "seq_len": t.seq_len,
            "batch": t.batch_size,
            "first_step_s": compile_s,
            "step_s": dt,
            "tokens_per_s": tps,
            "mfu": tps * fpt / (peak * jax.device_count()),
            "data_tokens_per_s": data_tps,
            "data_headroom": data_tps / tps,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sizes", default=",".join(SIZES))
    args = ap.parse_args()
    peak, source = device_peak_flops()
    rows = [bench_size(n, SIZES[n], args.steps, peak) for n in args.sizes.split(",")]
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"peak {peak / 1e9:.1f} GFLOP/s ({source})")
    head = (f"{'size':8} {'params':>8} {'seq':>5} {'batch':>5} {'compile s':>9} {'step ms':>8} "
            f"{'tok/s':>9} {'MFU':>6} {'data tok/s':>11} {'data x':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:8} {r['params_M']:7.2f}M {r['seq_len']:5d} {r['batch']:5d} "
              f"{r['first_step_s']:9.1f} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:9.0f} "
              f"{100 * r['mfu']:5.1f}% {r['data_tokens_per_s']:11.0f} {r['data_headroom']:6.0f}x")
    print(json.dumps({"bench": "train_throughput", "peak_flops": peak, "peak_source": source,
                      "rows": rows}))


if __name__ == "__main__":
    main()
