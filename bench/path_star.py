"""Path-star (issue 14's table): which training objectives learn to plan the path, trained by the
real CLI at about equal parameters, 3 seeds per arm, on G(2, 5) and G(5, 5).

    python bench/path_star.py              # the full table: 42 runs, about 3.3 hours on 2 cores
    python bench/path_star.py --graphs 2 --seeds 1 --arms next_token,planner --steps 1500
    python bench/path_star.py --graphs 2 --path-len 3 --seeds 1 --arms planner --planner block=2

Task: `data.path_star` (Bachmann & Nagarajan 2024; labels 0..49, the published token format),
its default train/validation streams; `--path-len l` runs G(d, l) instead of G(d, 5) (l = 3:
the node between source and goal is one edge lookup back from the goal). The metric is exact
match of the whole path under greedy decoding on the validation stream
(`greedy_sequence_accuracy` of `menagerie eval`; the model reads its own earlier answers);
chance on the decision (the source's next node) is 1/d.

Arms, all with the same trunk width, lr, schedule, batches and steps; `--layers` L blocks of
parameters beyond the embedding in every arm (L - 1 trunk blocks plus one head block, or L trunk
blocks), so the arms' parameters are about equal (the table gives each one's count):
  next_token    teacher forcing, an L-layer Transformer (the known failure: about 1/d);
  mtp_parallel  Gloeckle et al.: trunk L - 1, one extra parallel head (n_future 2) of one block;
  mtp_sequential DeepSeek-V3 MTP: trunk L - 1, one sequential module (depth 1);
  teacherless   the path's inputs are `$` (data.task.mode teacherless), an L-layer Transformer;
  reverse       the path written goal first (positive control), an L-layer Transformer;
  planner       `arch.planner` (kind planner): trunk L - 1, one planner layer, the plan
                conditioning the LM (condition_lm), the teacherless lookahead loss at its default
                weight. Its blocks end where the answer starts: P is the smallest divisor of the
                answer's first position that is >= the path length (7 on G(2, 5): 28 = 4 x 7;
                8 on G(5, 5): 64 = 8 x 8), so the plan of the block that ends with `=` is
                trained to predict the whole path from the prefix alone. `--planner KEY=VALUE`
                sets any other `model.head` key of this arm (`--planner block=2`).
  writer        the planner arm plus its plan writer (`arch.plan_writer`: one layer, 3 memory
                taps on its keys and values, from 0.25): it writes the block after `=`, the
                path, goal first from the prefix, and the LM reads the written path;
                `--planner` keys apply to it too.

Every run is one `menagerie train` process; `--jobs` run at once, each pinned to its own CPU
(one XLA thread pool per core is faster on 2 cores than two processes sharing both). Prints one
line per run, then a table (mean and the seeds' values; for the planner also `plan`, the mean
exact match of the path written at once from its plan, the eval's plan block accuracy); writes
`--results` (bench/results/path_star.json). For the writer arm also `written`: the exact match
of the path as the writer writes it greedily (the eval's writer block accuracy).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any

import yaml
from menagerie.data.path_star import PathStarConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLAN = "model/head/lookahead_block_accuracy"
WRITTEN = "model/head/writer_block_accuracy"
ARMS = (
    "next_token", "mtp_parallel", "mtp_sequential", "teacherless", "reverse", "planner", "writer"
)  # fmt: skip
WRITER = {"writer_layers": 1, "writer_taps": 3, "writer_taps_on": "keys_values"}
WRITER |= {"writer_tap_init": 0.25}
"""The writer arm's model.head keys beyond the planner arm's. The README's writer tables before
2026-12-03 ran it with the taps on the states, from zero (`--planner writer_taps_on=states
--planner writer_tap_init=0`)."""


def answer_block(task: PathStarConfig) -> int:
    """The planner's block P: the smallest divisor of the answer's first position (BOS + prefix)
    that is at least the path length, so a block ends with `=` and the next holds the path."""
    start = task.length - task.path_len
    return next(p for p in range(task.path_len, start + 1) if start % p == 0)


def planner_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--planner KEY=VALUE` pairs as `model.head` keys of the planner arm (values as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--planner {pair!r}: want KEY=VALUE, e.g. --planner block=2")
        out[key] = yaml.safe_load(value)
    return out


def arm_config(arm: str, degree: int, args) -> dict[str, Any]:
    """The CLI config of one arm on G(degree, args.path_len) (without seed and run_dir)."""
    task = PathStarConfig(degree=degree, path_len=args.path_len)
    mode = {"teacherless": "teacherless", "reverse": "reverse"}.get(arm, "forward")
    heads = {
        "mtp_parallel": {"kind": "mtp_parallel", "n_future": 2},
        "mtp_sequential": {"kind": "mtp_sequential", "depth": 1},
        "planner": {"kind": "planner", "block": answer_block(task), "planner_layers": 1}
        | {"lookahead_weight": 0.3, "condition_gate": False}
        | planner_overrides(args.planner),
    }
    heads["writer"] = heads["planner"] | WRITER | planner_overrides(args.planner)
    model = {"d_model": args.width, "n_layers": args.layers, "mixer": {"n_heads": 4}}
    if arm in heads:
        model |= {"n_layers": args.layers - 1, "head": heads[arm]}
    return {
        "model": model,
        "data": {"source": "synthetic", "task": {"kind": "path_star", "degree": degree,
                                                  "path_len": args.path_len,
                                                  "mode": mode}},
        "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": task.length - 1,
                  "eval_every": args.steps, "eval_batches": args.eval_batches,
                  "sample_tokens": 0},
        "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 15)},
        "checkpoint": {"every": 0},
        "log": {"every": max(1, args.steps // 5), "progress": False, "tensorboard": False},
    }  # fmt: skip


def _params(stdout: str) -> float:
    """The model's parameter count in millions, from the CLI's first line."""
    line = next(x for x in stdout.splitlines() if x.startswith("model "))
    return float(line.split(": ")[1].split("M params")[0])


def train(run_dir: Path, cfg: dict, cpus: Queue) -> dict[str, Any]:
    """One run through the real CLI on a CPU taken from `cpus`; its final eval metrics."""
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg | {"run_dir": str(run_dir)}))
    cmd = [sys.executable, "-m", "menagerie.train.cli", "train", "-c", str(path)]
    cpu = cpus.get()
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pin)
    finally:
        cpus.put(cpu)
    if done.returncode:
        raise RuntimeError(f"{run_dir.name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "eval"][-1]
    keep = ("loss", "accuracy", "sequence_accuracy", "greedy_accuracy", "greedy_sequence_accuracy")
    out = {k: last[k] for k in keep}
    if PLAN in last:  # the planner's path written at once from its plan (block-parallel)
        out["plan_sequence_accuracy"] = last[PLAN]
    if WRITTEN in last:  # the path as the writer writes it greedily, from the prefix alone
        out["written_sequence_accuracy"] = last[WRITTEN]
    return out | {"params_M": _params(done.stdout), "seconds": time.perf_counter() - t0}


def run_all(args) -> list[dict[str, Any]]:
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="path_star_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cpus: Queue = Queue()
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for i in range(args.jobs):
        cpus.put(usable[i] if args.jobs <= len(usable) and args.jobs > 1 else None)
    grid = list(itertools.product(args.graphs, args.seeds, args.arms))

    def one(key):
        degree, seed, arm = key
        cfg = arm_config(arm, degree, args)
        cfg["train"]["seed"] = seed
        row = {"graph": f"G({degree},{args.path_len})", "arm": arm, "seed": seed}
        row |= train(out_dir / f"g{degree}_{args.path_len}_{arm}_s{seed}", cfg, cpus)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one, grid))


def _mean_of(group: list[dict[str, Any]], name: str) -> str:
    """The mean of the runs' `<name>_sequence_accuracy` ("" where no run has it)."""
    values = [r[f"{name}_sequence_accuracy"] for r in group if f"{name}_sequence_accuracy" in r]
    return f"{statistics.mean(values):.3f}" if values else ""


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per graph and arm, the mean exact-match accuracy and each seed's."""
    lines = ["| graph | arm | params | greedy exact match (mean) | per seed | token acc | plan "
             "| written |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (graph, arm), group in itertools.groupby(rows, key=lambda r: (r["graph"], r["arm"])):
        group = list(group)
        acc = [r["greedy_sequence_accuracy"] for r in group]
        tok = statistics.mean(r["greedy_accuracy"] for r in group)
        seeds = ", ".join(f"{a:.3f}" for a in acc)
        plan, written = (_mean_of(group, key) for key in ("plan", "written"))
        lines.append(
            f"| {graph} | {arm} | {group[0]['params_M']:.3f}M | {statistics.mean(acc):.3f} | "
            f"{seeds} | {tok:.3f} | {plan} | {written} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--graphs", default="2,5", help="degrees d of G(d, l)")
    p.add_argument("--path-len", type=int, default=5, help="l of G(d, l): nodes per arm")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds run: first .. first+seeds-1")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--planner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model.head key of the planner arm, e.g. block=2 (repeatable)",
    )
    p.add_argument("--out", default=None, help="run folders (default: a temp dir)")
    p.add_argument("--results", default=str(RESULTS / "path_star.json"), help="the JSON written")
    args = p.parse_args()
    args.graphs = [int(d) for d in args.graphs.split(",")]
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    args.seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    t0 = time.perf_counter()
    rows = sorted(run_all(args), key=lambda r: (r["graph"], ARMS.index(r["arm"]), r["seed"]))
    kept = {k: v for k, v in vars(args).items() if k not in ("out", "results")}
    result = {"bench": "path_star", "args": kept, "rows": rows,
              "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
    print(table(rows))
    print(f"{result['minutes']:.1f} minutes")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
