"""Megalodon at long context (issue 11's targets): training throughput at 4K and 32K tokens beside
`megalodon-jax` and the baseline Transformer, where our step spends its time, and validation
bits/byte beside the baseline.

    python bench/long_context.py [--lengths 4096,32768] [--batches 8,1] [--chunk 1024] [--rounds 5]
    python bench/long_context.py --quick      # 1K/4K, chunk 256, 2 rounds: minutes (compiling)
    python bench/long_context.py --pieces [--lengths ...] [--batches ...] [--rounds ...]
    python bench/long_context.py --quality [--width 128] [--chunk 256] [--steps 120] [--out DIR]

Throughput (default mode). One process, CPU, tiny widths: Megalodon d=256, 2 layers, 1 head,
z_dim 128, value_dim 512, FFN 640 (2.5 D, the official presets' ratio), N 16, 8 TimestepNorm
groups, chunk 1024, the byte vocabulary of our tokenizer (256 bytes + EOS, padded to 384 rows,
the same on both sides). Rows, each a full jitted train step (forward, backward, clipping,
AdamW update) on real batches of the stdlib corpus:
  ours      our trainer's own step (`Trainer.jit_train_step`: donated state, weight decay on
            every parameter as the Megalodon presets set it, clip 1.0);
  peer      `megalodon-jax` (an independent JAX port) at the same config, trained the way its
            README shows (`compute_loss`, `eqx.filter_value_and_grad`, optax AdamW with weight
            decay 0.1 on every leaf, here with the same clip 1.0), jitted and donated;
  baseline  our Llama Transformer with the same width and depth and a SwiGLU width chosen so
            its parameter count matches Megalodon's (untied output, as Megalodon's); attention
            is `arch.attention_ops.attention` (`mixer.impl: xla`; the other choice, cudnn, is
            GPU-only): blocked causal, FlashAttention-style backward.
Our steps are compiled ahead of time and XLA's memory analysis is checked against the memory
available: a step that would not fit is not run (and said so), and the baseline then runs at
the longest halved length that fits; ours at 32K is compared with that row, a lower bound on
the 32K ratio, since the baseline's tokens/s only falls as its context grows.
Every row runs one untimed first step; then `--rounds` rounds run every row once each, in turn,
so load from elsewhere on the machine hits all rows alike. tokens/s is batch x length over the
median step; each ratio is also given from the best steps and from this process's CPU seconds
per step (a shared machine moves wall-clock time). Ratios and issue 11's targets:
  ours 32K / ours 4K >= 0.9 (the paper reports 0.94 on A100);  ours / peer at 4K >= 1.2;
  ours / baseline at 32K >= 3;  and, for reference, peer 32K / peer 4K and ours / peer at 32K.

Pieces (`--pieces`): forward+backward time of our CEMA (`MultiHeadComplexEMA`), TimestepNorm
and chunked attention alone, and of the whole model's loss, at each shape: which part of the
step costs what, and which part grows with the context.

Quality (`--quality`): Megalodon (the config above at d_model `--width`, other widths in the
same ratios, chunk `--chunk`) and the baseline with equal parameters are trained by the real
CLI (`python -m menagerie.train.cli train`), one after the other, on the same stdlib bytes at
context 2048 with the same batches, steps and optimizer (AdamW, lr 3e-3, warmup then cosine;
weight decay on every parameter for Megalodon as its presets, on matrices for the baseline as
its default), evaluating validation bits/byte every `--eval-every` steps on the same validation
batches. Reports both curves and the tokens seen, and writes bench/results/
long_context_quality.png when matplotlib is installed. Target: Megalodon's final validation
bits/byte <= the baseline's.

Prints a table and one JSON line. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from menagerie import arch
from menagerie.arch import MegalodonConfig
from menagerie.arch.megalodon import MultiHeadComplexEMA, TimestepNorm
from menagerie.data import ByteTokenizer
from menagerie.kernels.chunked_attention import chunked_attention
from menagerie.train.config import RunConfig, build_config
from menagerie.train.metrics import read_metrics
from menagerie.train.step import token_losses
from menagerie.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# The benchmark's Megalodon (issue 11: d=256, 2 layers, z=128, v=512) is `megalodon_model(chunk)`;
# the baseline is BASELINE at the same width with model.ffn.hidden_dim matching the parameters.
# Both models loop their 2 layers (see `megalodon_model`).
BASELINE = {"family": "transformer", "n_layers": 2, "tie_embeddings": False, "scan_layers": False}
MEGALODON_OPTIM = {"weight_decay_on": "all"}  # as configs/megalodon/*.yaml
TARGETS = {
    "ours_32k_over_4k": 0.9,
    "ours_over_peer_4k": 1.2,
    "ours_over_baseline_32k": 3.0,
}


# ---- configs ---------------------------------------------------------------------------------


def megalodon_model(chunk: int, width: int = 256) -> dict[str, Any]:
    """Megalodon with d_model `width`, z_dim D/2, value_dim 2D, FFN 2.5D (the official presets'
    ratio), one TimestepNorm group per 32 features, 1 head, N 16, 2 layers, untied output.
    The 2 layers are looped, not scanned (`megalodon-jax` loops its layers too): on XLA:CPU the
    layer scan's stacked residuals cost about a sixth of the step (4096 x 8: 15.9 s scanned,
    13.3 s looped, 2026-11-30)."""
    return {
        "family": "megalodon",
        "scan_layers": False,
        "d_model": width,
        "n_layers": BASELINE["n_layers"],
        "num_heads": 1,
        "z_dim": width // 2,
        "value_dim": 2 * width,
        "ffn_hidden_dim": 5 * width // 2,
        "cema_ndim": 16,
        "norm_num_groups": max(1, width // 32),
        "chunk_size": chunk,
    }


def run_config(model: dict, seq_len: int, batch: int, **sections: Any) -> RunConfig:
    """A run config with the byte tokenizer's vocabulary resolved (what the trainer builds)."""
    train = {"seq_len": seq_len, "batch_size": batch, **sections.pop("train", {})}
    raw = {"model": model, "train": train, **sections}
    cfg = build_config(raw)
    return cfg.model_copy(update={"model": cfg.model.with_vocab(ByteTokenizer.vocab_size)})


def num_params(model: dict) -> int:
    return run_config(model, 64, 1).model.num_params()


def baseline_model(target_params: int, width: int = 256) -> dict[str, Any]:
    """BASELINE at d_model `width` (heads of 64) with the SwiGLU width (a multiple of 8) whose
    parameter count is nearest `target_params`."""
    model = {**BASELINE, "d_model": width, "mixer": {"kind": "attention", "n_heads": width // 64}}
    fixed = num_params({**model, "ffn": {"kind": "swiglu", "hidden_dim": 8}})
    per_unit = 3 * width * BASELINE["n_layers"]  # SwiGLU: 3 D F per layer
    hidden = max(8, 8 * round((target_params - fixed) / per_unit / 8) + 8)
    return {**model, "ffn": {"kind": "swiglu", "hidden_dim": hidden}}


# ---- the rows --------------------------------------------------------------------------------

Step = Callable[[Any, Any], tuple[Any, Any]]


@dataclass
class Row:
    """One timed train step: its jitted function, its state, and batches to cycle through."""

    name: str
    impl: str
    seq_len: int
    batch: int
    params: int
    flops_per_token: float
    step: Step
    state: Any
    batches: list[Any]
    context: Callable[[], AbstractContextManager] = nullcontext
    compile_s: float | None = None
    memory_bytes: int | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    first_s: float = 0.0

    def run(self, i: int) -> float:
        """One step on batch i (cyclically), waited for; returns its wall time in seconds and
        appends the CPU time this process spent meanwhile (all threads) to `cpu_times`."""
        with self.context():
            t0, c0 = time.perf_counter(), time.process_time()
            self.state, out = self.step(self.state, self.batches[i % len(self.batches)])
            jax.block_until_ready((self.state, out))
        self.cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0


class DoesNotFit(Exception):
    """A compiled step that needs more memory than the machine has available."""


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def compile_fitting(step: Any, *args: Any) -> tuple[Any, float, int]:
    """(executable, compile seconds, bytes it needs) of a jitted step, compiled ahead of time;
    DoesNotFit when XLA's memory analysis exceeds 90% of the available memory."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    needed = 0
    if mem is not None:
        needed = mem.argument_size_in_bytes + mem.output_size_in_bytes
        needed += mem.temp_size_in_bytes - mem.alias_size_in_bytes
    free = available_bytes()
    if needed > 0.9 * free:
        raise DoesNotFit(
            f"needs {needed / 1e9:.1f} GB (XLA memory analysis), {free / 1e9:.1f} GB available"
        )
    return compiled, seconds, needed


def trainer_row(name: str, impl: str, cfg: RunConfig, run_dir: str, n_batches: int) -> Row:
    """A row running our trainer's own jitted, donated step on batches of its real data,
    compiled here (DoesNotFit if it would not fit in memory)."""
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    trainer = Trainer(cfg)
    t = trainer.cfg.train
    it = trainer.train_data.batches(t.batch_size, seed=t.seed)
    with trainer.context():
        state = trainer.init_state()
        batches = [trainer._global_batch(next(it)) for _ in range(n_batches)]
        step, compile_s, needed = compile_fitting(trainer.jit_train_step(), state, batches[0])
    return Row(
        name=name,
        impl=impl,
        seq_len=t.seq_len,
        batch=t.batch_size,
        params=trainer.cfg.model.num_params(),
        flops_per_token=trainer.cfg.model.flops_per_token(t.seq_len),
        step=step,
        state=state,
        batches=batches,
        context=trainer.context,
        compile_s=compile_s,
        memory_bytes=needed,
    )


def peer_config(model: MegalodonConfig) -> Any:
    """`megalodon_jax.MegalodonConfig` with our config's values (official field names)."""
    from megalodon_jax import MegalodonConfig as PeerConfig

    return PeerConfig(
        vocab_size=model.padded_vocab,
        model_dim=model.d_model,
        num_layers=model.n_layers,
        num_heads=model.num_heads,
        z_dim=model.z_dim,
        value_dim=model.value_dim,
        ffn_hidden_dim=model.ffn_hidden_dim,
        cema_ndim=model.cema_ndim,
        chunk_size=model.chunk_size,
        norm_num_groups=model.norm_num_groups,
        norm_eps=model.norm_eps,
        rope_base=model.rope_base,
        swiglu=model.swiglu,
        share_emb=model.tie_embeddings,
    )


def peer_step(cfg: RunConfig) -> tuple[Step, Any]:
    """(jitted, donated step, initial state) of `megalodon-jax` trained as its README shows:
    `compute_loss` under `eqx.filter_value_and_grad`, optax AdamW on every leaf (plus our clip,
    so both sides do the same work), `eqx.apply_updates`."""
    from megalodon_jax import MegalodonForCausalLM

    o = cfg.optim
    model = eqx.filter_jit(MegalodonForCausalLM)(peer_config(cfg.model), key=jax.random.key(0))
    optimizer = optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )

    @eqx.filter_value_and_grad
    def loss_fn(candidate, input_ids):
        return candidate.compute_loss(input_ids, input_ids)  # labels shifted inside

    def step(state, input_ids):
        model, opt_state = state
        loss, grads = loss_fn(model, input_ids)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return (eqx.apply_updates(model, updates), opt_state), loss

    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    return eqx.filter_jit(step, donate="all"), (model, opt_state)


def peer_row(name: str, cfg: RunConfig, token_batches: list[jax.Array]) -> Row:
    step, state = peer_step(cfg)
    t = cfg.train
    return Row(
        name=name,
        impl="megalodon-jax",
        seq_len=t.seq_len,
        batch=t.batch_size,
        params=sum(x.size for x in jax.tree.leaves(eqx.filter(state[0], eqx.is_array))),
        flops_per_token=cfg.model.flops_per_token(t.seq_len),
        step=step,
        state=state,
        batches=token_batches,
    )


def build_rows(args: argparse.Namespace, tmp: str, notes: list[str]) -> Iterator[Row]:
    """ours and peer at every length, then the baseline at every length (or, where its step
    does not fit in memory, at the longest power-of-two fraction of it that does)."""
    mega = megalodon_model(args.chunk)
    base = baseline_model(num_params(mega))
    shapes = list(zip(args.lengths, args.batches, strict=True))
    for seq, batch in shapes:
        cfg = run_config(mega, seq, batch, optim=MEGALODON_OPTIM, log={"tensorboard": False})
        try:
            ours = trainer_row(f"ours@{seq}", "ours", cfg, f"{tmp}/ours{seq}", args.data_batches)
        except DoesNotFit as e:
            notes.append(f"ours@{seq} not run: {e}")
            continue
        yield ours
        if not args.no_peer:
            # Plain single-device arrays: tokens sharded over the trainer's mesh would make the
            # peer's state come back sharded, and its second call compile again.
            tokens = [jnp.asarray(np.asarray(b["tokens"])) for b in ours.batches]
            yield peer_row(f"peer@{seq}", cfg, tokens)
    done = 0
    for seq, batch in shapes:
        if seq in args.baseline_lengths:
            row = fitting_baseline(base, seq, batch, done, f"{tmp}/base", notes)
            if row is not None:
                done = row.seq_len
                yield row


def fitting_baseline(
    model: dict, seq: int, batch: int, shorter: int, run_dir: str, notes: list[str]
) -> Row | None:
    """The baseline at `seq`, halving the length while its step does not fit in memory (down to
    just above `shorter`, a length already run); None if none fits."""
    while seq > shorter:
        cfg = run_config(model, seq, batch, log={"tensorboard": False})
        try:
            return trainer_row(f"baseline@{seq}", "baseline", cfg, f"{run_dir}{seq}", 2)
        except DoesNotFit as e:
            notes.append(f"baseline@{seq} not run: {e}")
            print(f"  {notes[-1]}", file=sys.stderr)
            seq //= 2
    return None


# ---- timing ----------------------------------------------------------------------------------


def warm_up(row: Row) -> None:
    """Run the first step (compiling it if not compiled yet): timed as `first_s`, not counted."""
    row.first_s = row.run(0)
    compiled = "" if row.compile_s is None else f"compiled in {row.compile_s:.1f} s, "
    print(f"  {row.name}: {compiled}first step {row.first_s:.1f} s", file=sys.stderr)


def time_rounds(rows: list[Row], rounds: int) -> list[float]:
    """`rounds` rounds, each running every row once, in turn; returns the 1-minute load
    average after each round (others' work on the machine shows there)."""
    load = []
    for row in rows:
        row.cpu_times.clear()  # the first step's
    for r in range(rounds):
        for row in rows:
            row.times.append(row.run(1 + r))
        load.append(os.getloadavg()[0])
        summary = ", ".join(f"{row.name} {row.times[-1]:.2f}s" for row in rows)
        print(f"  round {r + 1}/{rounds} (load {load[-1]:.1f}): {summary}", file=sys.stderr)
    return load


def row_result(row: Row) -> dict[str, Any]:
    med = statistics.median(row.times)
    tokens = row.batch * row.seq_len
    return {
        "row": row.name,
        "impl": row.impl,
        "seq_len": row.seq_len,
        "batch": row.batch,
        "params": row.params,
        "compile_s": row.compile_s,  # None: compiled inside the first step (the peer)
        "first_step_s": row.first_s,
        "memory_gb": None if row.memory_bytes is None else row.memory_bytes / 1e9,
        "step_s_median": med,
        "step_s_best": min(row.times),
        "step_s_all": row.times,
        "cpu_s_median": statistics.median(row.cpu_times),
        "tokens_per_s": tokens / med,
        "tokens_per_s_best": tokens / min(row.times),
        "tokens_per_cpu_s": tokens / statistics.median(row.cpu_times),
        "model_gflop_per_s": tokens / med * row.flops_per_token / 1e9,
    }


def ratio(results: dict[str, dict], a: str, b: str | None, metric: str) -> float | None:
    if a not in results or b not in results:
        return None
    return results[a][metric] / results[b][metric]


def longest_baseline(results: dict[str, dict], up_to: int) -> str | None:
    """The name of the longest baseline row of at most `up_to` tokens."""
    rows = [r for r in results.values() if r["impl"] == "baseline" and r["seq_len"] <= up_to]
    return max(rows, key=lambda r: r["seq_len"])["row"] if rows else None


def ratios(results: dict[str, dict], short: int, long: int, metric: str) -> dict[str, Any]:
    """Issue 11's ratios of `metric` by row name; None where a row was not run. Where the
    baseline did not fit at `long`, ours at `long` is compared with its longest row that ran
    (`baseline_long`): a lower bound, since the baseline's tokens/s only falls as its context
    grows."""
    base_long = longest_baseline(results, long)
    pairs = {
        "ours_32k_over_4k": (f"ours@{long}", f"ours@{short}"),
        "ours_over_peer_4k": (f"ours@{short}", f"peer@{short}"),
        "ours_over_baseline_32k": (f"ours@{long}", base_long),
        "peer_32k_over_4k": (f"peer@{long}", f"peer@{short}"),
        "ours_over_peer_32k": (f"ours@{long}", f"peer@{long}"),
        "ours_over_baseline_4k": (f"ours@{short}", f"baseline@{short}"),
    }
    out: dict[str, Any] = {k: ratio(results, a, b, metric) for k, (a, b) in pairs.items()}
    return out | {"baseline_long": base_long}


# Each ratio three ways: median steps (the headline), best steps (the least disturbed by other
# work on the machine), and median CPU seconds of this process per step (not counting time
# other processes took the cores, but counting any spinning of idle threads).
RATIO_METRICS = {"median": "tokens_per_s", "best": "tokens_per_s_best", "cpu": "tokens_per_cpu_s"}


def print_throughput(rows: list[dict], rat: dict[str, dict], notes: list[str]) -> None:
    head = (
        f"{'row':16} {'impl':13} {'seq':>6} {'batch':>5} {'params':>9} {'mem GB':>6} "
        f"{'1st s':>6} {'med s':>7} {'best s':>7} {'cpu s':>7} {'tok/s':>7} {'GFLOP/s':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mem = "" if r["memory_gb"] is None else f"{r['memory_gb']:.1f}"
        print(
            f"{r['row']:16} {r['impl']:13} {r['seq_len']:6d} {r['batch']:5d} {r['params']:9,d} "
            f"{mem:>6} {r['first_step_s']:6.1f} {r['step_s_median']:7.2f} "
            f"{r['step_s_best']:7.2f} {r['cpu_s_median']:7.2f} {r['tokens_per_s']:7.0f} "
            f"{r['model_gflop_per_s']:7.1f}"
        )
    for note in notes:
        print(note)
    print(f"{'ratio':24} " + " ".join(f"{'by ' + k:>30}" for k in rat))
    for name in rat["median"]:
        print(f"{name:24} " + " ".join(f"{verdict(name, r[name]):>30}" for r in rat.values()))


def verdict(name: str, value: Any) -> str:
    """A ratio as text, with its target where it has one."""
    if not isinstance(value, float):
        return "not run" if value is None else str(value)
    target = TARGETS.get(name)
    if target is None:
        return f"{value:.2f}x"
    return f"{value:.2f}x  (target >= {target}: {'met' if value >= target else 'MISSED'})"


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for row in build_rows(args, tmp, notes):
            warm_up(row)
            rows.append(row)
        load = time_rounds(rows, args.rounds)
    results = [row_result(r) for r in rows]
    by_name = {r["row"]: r for r in results}
    short, long = min(args.lengths), max(args.lengths)
    rat = {k: ratios(by_name, short, long, m) for k, m in RATIO_METRICS.items()}
    print_throughput(results, rat, notes)
    return {
        "bench": "long_context",
        "mode": "throughput",
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpu_count": os.cpu_count(),
        "chunk_size": args.chunk,
        "rounds": args.rounds,
        "short_len": min(args.lengths),
        "long_len": max(args.lengths),
        "load_average_per_round": load,
        "rows": results,
        "notes": notes,
        "ratios": rat["median"],
        "ratios_best_step": rat["best"],
        "ratios_cpu_time": rat["cpu"],
        "targets": TARGETS,
    }


# ---- quality ---------------------------------------------------------------------------------


def quality_config(model: dict, args: argparse.Namespace, optim: dict) -> dict[str, Any]:
    """The YAML of one quality run: same data, batches, steps and schedule for both models."""
    return {
        "model": model,
        "train": {
            "seq_len": args.quality_len,
            "batch_size": args.quality_batch,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "eval_batches": args.eval_batches,
            "sample_tokens": 0,
        },
        "optim": {"lr": args.lr, "warmup_steps": args.warmup, **optim},
        "checkpoint": {"every": args.steps},
        "log": {"tensorboard": False},
    }


def train_cli(name: str, raw: dict, out: Path) -> Path:
    """`menagerie train -c <name>.yaml` in a fresh process; returns the run folder."""
    out.mkdir(parents=True, exist_ok=True)
    path, run_dir = out / f"{name}.yaml", out / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "menagerie.train.cli", "train", "-c", str(path)]
    cmd += [f"run_dir={run_dir}", "--start-over"]
    print("  $ " + " ".join(cmd), file=sys.stderr)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr)  # stdout: the JSON only
    if proc.returncode:
        raise SystemExit(f"{name}: menagerie train exited with {proc.returncode}")
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return run_dir


def curve(run_dir: Path, tokens_per_step: int) -> list[dict[str, float]]:
    """Validation bits/byte per evaluated step, with the training tokens seen by then."""
    return [
        {"step": step, "tokens": step * tokens_per_step, "bits_per_byte": row["bits_per_byte"]}
        for step, row in sorted(read_metrics(run_dir, "eval").items())
    ]


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> str | None:
    """The curves as a PNG; None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        tokens_m = [p["tokens"] / 1e6 for p in points]
        ax.plot(tokens_m, [p["bits_per_byte"] for p in points], "o-", label=name)
    ax.set(xlabel="training tokens (M)", ylabel="validation bits/byte", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def quality(args: argparse.Namespace) -> dict[str, Any]:
    mega = megalodon_model(args.chunk, args.width)
    base = baseline_model(num_params(mega), args.width)
    out = Path(args.out or tempfile.mkdtemp(prefix="long_context_quality_"))
    models = {"megalodon": (mega, MEGALODON_OPTIM), "baseline": (base, {})}
    tokens_per_step = args.quality_len * args.quality_batch
    curves, params = {}, {}
    for name, (model, optim) in models.items():
        params[name] = num_params(model)
        run_dir = train_cli(name, quality_config(model, args, optim), out)
        curves[name] = curve(run_dir, tokens_per_step)
    final = {name: c[-1]["bits_per_byte"] for name, c in curves.items()}
    title = f"bytes, context {args.quality_len}, {args.steps * tokens_per_step / 1e6:.1f}M tokens"
    png = plot(curves, RESULTS / "long_context_quality.png", title)
    print_quality(curves, params)
    return {
        "bench": "long_context",
        "mode": "quality",
        "context": args.quality_len,
        "steps": args.steps,
        "tokens_seen": args.steps * tokens_per_step,
        "params": params,
        "models": {name: model for name, (model, _) in models.items()},
        "curves": curves,
        "final_bits_per_byte": final,
        "megalodon_at_most_baseline": final["megalodon"] <= final["baseline"],
        "png": png,
        "run_dirs": str(out),
    }


def print_quality(curves: dict[str, list[dict]], params: dict[str, int]) -> None:
    names = list(curves)
    print(f"{'step':>6} {'tokens':>10} " + " ".join(f"{n + ' bpb':>14}" for n in names))
    for points in zip(*curves.values(), strict=True):
        values = " ".join(f"{p['bits_per_byte']:14.4f}" for p in points)
        print(f"{points[0]['step']:6d} {points[0]['tokens']:10,d} {values}")
    print("params: " + ", ".join(f"{n} {p:,d}" for n, p in params.items()))


# ---- pieces: where our Megalodon step spends its time ----------------------------------------


def grad_timer(fn: Callable[..., jax.Array], *args: Any) -> Callable[[], None]:
    """A callable running jit(grad) of <fn(*args), fixed random cotangent> w.r.t. every arg."""
    out = jax.eval_shape(fn, *args)
    cot = jax.random.normal(jax.random.key(1), out.shape, out.dtype)
    grad = jax.jit(jax.grad(lambda *a: jnp.vdot(fn(*a), cot), argnums=tuple(range(len(args)))))
    return lambda: jax.block_until_ready(grad(*args))


def module_fn(module: nnx.Module, call: Callable) -> tuple[Callable, Any]:
    """(pure function of (params, *inputs), params) of `call(module, *inputs)`."""
    graphdef, params = nnx.split(module)
    return lambda p, *a: call(nnx.merge(graphdef, p), *a), params


def from_zero(module: nnx.Module, x: jax.Array) -> jax.Array:
    """A Megalodon operator's output from its zero state (what one training call computes)."""
    return module(x, module.zero_state(x.shape[0]))[0]


def piece_timers(model: MegalodonConfig, seq: int, batch: int) -> dict[str, Callable[[], None]]:
    """Forward+backward of our operators at one shape, and of the whole model's loss."""
    key = iter(jax.random.split(jax.random.key(0), 5))
    x = jax.random.normal(next(key), (batch, seq, model.d_model))
    h, dz, dv = model.num_heads, model.z_dim // model.num_heads, model.value_dim // model.num_heads
    q, k = (jax.random.normal(next(key), (batch, seq, h, dz)) / dz**0.5 for _ in range(2))
    v = jax.random.normal(next(key), (batch, seq, h, dv))
    tokens = jax.random.randint(next(key), (batch, seq), 0, 256)
    rngs = nnx.Rngs(0)
    cema, cema_p = module_fn(MultiHeadComplexEMA(model, rngs=rngs), from_zero)
    norm, norm_p = module_fn(TimestepNorm(model, rngs=rngs), from_zero)
    whole, whole_p = module_fn(
        arch.build(model, rngs=rngs), lambda m, t: token_losses(m(t).logits, t)[0].mean()
    )
    attention = partial(
        chunked_attention, chunk_size=model.chunk_size, scale=1.0, impl=model.attention_impl
    )
    return {
        "cema": grad_timer(cema, cema_p, x),
        "timestep_norm": grad_timer(norm, norm_p, x),
        "chunked_attention": grad_timer(attention, q, k, v),
        "model_loss": grad_timer(lambda p: whole(p, tokens), whole_p),
    }


def pieces(args: argparse.Namespace) -> dict[str, Any]:
    """Median fwd+bwd time of each piece at every (length, batch), interleaved over rounds."""
    timers = {}
    for seq, batch in zip(args.lengths, args.batches, strict=True):
        model = run_config(megalodon_model(args.chunk), seq, batch).model
        for name, timer in piece_timers(model, seq, batch).items():
            timer()  # compile
            timers[(seq, batch, name)] = timer
    times: dict[tuple, list[float]] = {key: [] for key in timers}
    for _ in range(args.rounds):
        for key, timer in timers.items():
            t0 = time.perf_counter()
            timer()
            times[key].append(time.perf_counter() - t0)
    rows = [
        {"seq_len": s, "batch": b, "piece": n, "fwd_bwd_s_median": statistics.median(t), "all": t}
        for (s, b, n), t in times.items()
    ]
    for r in rows:
        print(f"{r['seq_len']:6d} x{r['batch']:<3d} {r['piece']:18} {r['fwd_bwd_s_median']:8.3f} s")
    return {"bench": "long_context", "mode": "pieces", "chunk_size": args.chunk, "rows": rows}


# ---- command line ----------------------------------------------------------------------------


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="1024,4096 (batch 4,1), chunk 256, 2 rounds"
    )
    ap.add_argument("--lengths", type=ints, default=[4096, 32768], help="short,long context")
    ap.add_argument("--batches", type=ints, default=[8, 1], help="batch at each length")
    ap.add_argument("--chunk", type=int, help="Megalodon chunk_size (1024; --quality: 256)")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per row (interleaved)")
    ap.add_argument("--data-batches", type=int, default=3, help="distinct batches per row")
    ap.add_argument("--baseline-lengths", type=ints, help="lengths the baseline runs (all)")
    ap.add_argument("--no-peer", action="store_true", help="leave out megalodon-jax")
    ap.add_argument("--quality", action="store_true", help="run the quality comparison instead")
    ap.add_argument("--pieces", action="store_true", help="time our operators' fwd+bwd instead")
    ap.add_argument("--width", type=int, default=128, help="quality: d_model of both models")
    ap.add_argument("--steps", type=int, default=120, help="quality: optimizer steps per model")
    ap.add_argument("--quality-len", type=int, default=2048, help="quality: context")
    ap.add_argument("--quality-batch", type=int, default=4, help="quality: batch size")
    ap.add_argument("--eval-every", type=int, default=20, help="quality: steps between evals")
    ap.add_argument("--eval-batches", type=int, default=4, help="quality: batches per eval")
    ap.add_argument("--lr", type=float, default=3e-3, help="quality: peak learning rate")
    ap.add_argument("--warmup", type=int, default=20, help="quality: warmup steps")
    ap.add_argument("--out", help="quality: folder for the two runs (default: a temp folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.batches, args.chunk = [1024, 4096], [4, 1], 256
        args.rounds = min(args.rounds, 2)
    if args.chunk is None:
        args.chunk = 256 if args.quality else 1024
    if args.baseline_lengths is None:
        args.baseline_lengths = args.lengths
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", file=sys.stderr)
    mode = quality if args.quality else pieces if args.pieces else throughput
    result = mode(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
