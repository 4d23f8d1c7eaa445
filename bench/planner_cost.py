"""What the planner head costs on text (issue 14's targets): next-token bits/byte at equal steps
and train-step time, the default job with and without `model.head.kind=planner`.

    python bench/planner_cost.py                       # 2 seeds per arm, 240 steps, 20 timed steps
    python bench/planner_cost.py --seeds 3 --steps 480 --rounds 40 --head planner_layers=1
    python bench/planner_cost.py --seeds 0 --head writer_layers=1 writer_taps=3   # step time only

Step time: both models' real train steps (`Trainer.jit_train_step`, donated, on the same stdlib
batches) compiled in this process, then run alternately, each step timed alone, so load from
elsewhere on the machine hits both alike; `step_ratio` = planner / baseline median step.
Target: <= 1.15.
Quality: each arm trained by the real CLI (`menagerie train`, the default model, data and
schedule; `--steps` steps) once per seed; the final validation bits/byte of the LM logits
(with the planner, the LM head conditioned on the plan: the model's own next-token output);
`bpb_ratio` = planner / baseline mean. Target: <= 1.01.
Prints a table and one JSON line; writes bench/results/planner_cost.json. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from menagerie.train.config import load_config
from menagerie.train.metrics import read_metrics
from menagerie.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def arms(head: list[str]) -> dict[str, list[str]]:
    """Overrides of the default job per arm: the baseline, and the planner head (+ `head`)."""
    return {"baseline": [], "planner": ["model.head.kind=planner", *head]}


def step_times(overrides: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    """Seconds per train step of each arm, alternating, after a compile and a warm-up step."""
    steps, batches = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in overrides.items():
            cfg = load_config(None, [*extra, f"run_dir={tmp}/{name}", "log.tensorboard=false"])
            trainer = Trainer(cfg)
            if batches is None:
                t = trainer.cfg.train
                it = trainer.train_data.batches(t.batch_size, seed=t.seed)
                batches = [trainer._global_batch(next(it)) for _ in range(rounds + 2)]
            steps[name] = [trainer.jit_train_step(), trainer.init_state()]
    times = {name: [] for name in steps}
    for i, batch in enumerate(batches):
        for name, entry in steps.items():
            t0 = time.perf_counter()
            entry[1], m = entry[0](entry[1], batch)
            jax.block_until_ready(m)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return times


def final_bpb(run_dir: Path, extra: list[str], seed: int, steps: int) -> float:
    """One default-job run through the real CLI; its final validation bits/byte."""
    cmd = [sys.executable, "-m", "menagerie.train.cli", "train", f"run_dir={run_dir}", *extra,
           f"train.seed={seed}", f"train.steps={steps}", "train.sample_tokens=0",
           "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return read_metrics(run_dir, "eval")[steps]["bits_per_byte"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="quality runs per arm (0: step time only)")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--rounds", type=int, default=20, help="timed steps per arm")
    p.add_argument("--head", nargs="*", default=[], help="more model.head overrides: KEY=VALUE")
    args = p.parse_args()
    overrides = arms([f"model.head.{kv}" for kv in args.head])
    times = step_times(overrides, args.rounds)
    median = {k: statistics.median(v) for k, v in times.items()}
    bpb: dict[str, list[float]] = {k: [] for k in overrides}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name, extra in overrides.items():
                bpb[name].append(final_bpb(Path(tmp) / f"{name}{seed}", extra, seed, args.steps))
                print(name, seed, bpb[name][-1], flush=True)
    mean = {k: statistics.mean(v) if v else float("nan") for k, v in bpb.items()}
    params = {k: load_config(None, [*v, "run_dir=x"]).model for k, v in overrides.items()}
    out = {
        "bench": "planner_cost",
        "args": vars(args),
        "step_s_median": median,
        "step_ratio": median["planner"] / median["baseline"],
        "bits_per_byte": bpb,
        "bpb_ratio": mean["planner"] / mean["baseline"] if args.seeds else None,
        "head": params["planner"].head.model_dump(),
    }
    print("| arm | median step | eval bits/byte (per seed) | mean |\n|---|---|---|---|")
    for name in overrides:
        seeds = ", ".join(f"{b:.4f}" for b in bpb[name])
        print(f"| {name} | {1e3 * median[name]:.1f} ms | {seeds} | {mean[name]:.4f} |")
    quality = f"{out['bpb_ratio']:.4f}" if args.seeds else "not run (--seeds 0)"
    print(f"step ratio {out['step_ratio']:.3f} (target <= 1.15), bits/byte ratio "
          f"{quality} (target <= 1.01)")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "planner_cost.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
