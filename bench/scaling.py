"""Step time of the small baseline on 1, 2, 4 and 8 simulated CPU devices under data, fsdp,
tensor and sequence sharding, split into compute and collectives from a profile.

    python bench/scaling.py [--devices 1,2,4,8] [--modes data,fsdp,tensor,sequence] [--steps 5]

Each device count is its own process (XLA_FLAGS=--xla_force_host_platform_device_count=N set
before JAX starts), which builds the real Trainer on configs/transformer/small.yaml once per mode
(`mesh.<mode>=-1`, every other axis 1; on one device the modes are one run) and runs its jitted,
donated train step on stdlib batches: compiled ahead of time, one step to warm up, `--steps` timed
(median wall time), then `--profile-steps` under `jax.profiler.trace`.

The split: the trace holds one event per executed XLA op (thunk), with its device and HLO
instruction name; the compiled module's text gives each name's opcode. Collectives are the
all-reduce, all-gather, reduce-scatter, collective-permute and all-to-all ops (and their
-start/-done halves). `coll %` is, averaged over the
devices, the time a device spends inside collectives (the union of their intervals) as a share
of the profiled steps' wall time; `coll ms` is that share of the median step and `compute ms`
the rest of it (everything else, host dispatch included). SPMD resharding shows up as these
same collectives (its local slices and copies count as compute: they cannot be told apart from
the model's own). `wait %` is the part of the collective time spent in XLA:CPU's rendezvous,
waiting for the other devices to arrive: with devices sharing cores, mostly time the others
spend computing; `no wait` is `coll %` without it.

Simulated devices share the machine's cores: this measures the overhead sharding adds, not a
speed-up. Target: collectives at most 15% of step time at 8 devices with FSDP. Prints a table
and one JSON line; writes bench/results/scaling.json (`--out`). Asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PRESET = ROOT / "configs" / "transformer" / "small.yaml"
MODES = ("data", "fsdp", "tensor", "sequence")
COLLECTIVE = re.compile(
    r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|collective-broadcast)"
    r"(-start|-done)?$"
)
TARGET = 0.15


def mesh_overrides(mode: str) -> list[str]:
    """The whole mesh on one axis."""
    return [f"mesh.{axis}={-1 if axis == mode else 1}" for axis in MODES]


# ---- the profile ----------------------------------------------------------------------------


def collective_ops(hlo_text: str) -> set[str]:
    """Names of the instructions of a compiled HLO module whose opcode is a collective. (Trace
    events carry the instruction's name, which JAX may take from its own op: a `ppermute` in
    shard_map is the collective-permute `ppermute.3`.)"""
    names = set()
    for line in hlo_text.splitlines():
        head, eq, rest = line.strip().removeprefix("ROOT ").partition(" = ")
        if eq and COLLECTIVE.match(_opcode(rest)):
            names.add(head.lstrip("%"))
    return names


def _opcode(rest: str) -> str:
    """'f32[2]{0} all-gather(...)' or '(f32[], s32[]) all-reduce(...)' -> the opcode."""
    depth = 0
    for i, c in enumerate(rest):  # skip the shape, which may be a tuple
        depth += (c == "(") - (c == ")")
        if depth == 0 and c == " ":
            return rest[i + 1 :].split("(", 1)[0]
    return ""


def collective_time(
    trace_file: Path, collectives: set[str], module: str = "train_step"
) -> dict[str, list[float]]:
    """Per device (by `device_ordinal`), the time (µs) inside the ops named in `collectives` of
    `module` in a Chrome/Perfetto trace ('collective': the union of their intervals, so ops that
    overlap count once) and inside those ops' rendezvous ('wait')."""
    events = json.loads(gzip.open(trace_file).read())["traceEvents"]
    by_thread: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    spans: dict[str, dict[str, list]] = {}
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[tuple[float, str | None]] = []  # (end, device of an enclosing collective)
        for e in thread:
            while stack and stack[-1][0] <= e["ts"]:
                stack.pop()
            args = e.get("args") or {}
            inside = stack[-1][1] if stack else None
            span = (e["ts"], e["ts"] + e["dur"])
            if module in args.get("hlo_module", "") and args["hlo_op"] in collectives:
                inside = args["device_ordinal"]
                spans.setdefault(inside, {"collective": [], "wait": []})["collective"].append(span)
            elif inside is not None and e["name"] == "Rendezvous":
                spans[inside]["wait"].append(span)
            stack.append((span[1], inside))
    return {kind: [_union(s[kind]) for s in spans.values()] for kind in ("collective", "wait")}


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# ---- one device count (the child process) ----------------------------------------------------


def measure(mode: str, steps: int, profile_steps: int, tmp: Path) -> dict:
    import jax
    from menagerie.train.config import load_config
    from menagerie.train.trainer import Trainer

    overrides = [f"run_dir={tmp / mode}", "log.tensorboard=false", *mesh_overrides(mode)]
    cfg = load_config(PRESET, overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg)
    t = trainer.cfg.train
    state = trainer.init_state()
    step_fn = trainer.jit_train_step()
    it = trainer.train_data.batches(t.batch_size, seed=t.seed)
    batches = [trainer._global_batch(next(it)) for _ in range(1 + steps + profile_steps)]
    with trainer.context():
        t0 = time.perf_counter()
        step_fn = step_fn.lower(state, batches[0]).compile()  # its HLO names the collectives
        times = [time.perf_counter() - t0]
        for batch in batches[: 1 + steps]:
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
        with jax.profiler.trace(str(tmp / f"profile-{mode}"), create_perfetto_trace=True):
            t0 = time.perf_counter()
            for batch in batches[1 + steps :]:
                state, metrics = step_fn(state, batch)
                jax.block_until_ready((state, metrics))
            profiled_us = (time.perf_counter() - t0) * 1e6
    (trace,) = (tmp / f"profile-{mode}").rglob("*.trace.json.gz")
    per_device = collective_time(trace, collective_ops(step_fn.as_text()))
    coll, wait = (statistics.mean(per_device[k] or [0.0]) for k in ("collective", "wait"))
    step = statistics.median(times[2:])
    share = coll / profiled_us
    return {
        "devices": jax.device_count(),
        "mode": mode if jax.device_count() > 1 else "-",
        "mesh": dict(trainer.mesh.shape),
        "compile_s": times[0],
        "step_s_median": step,
        "step_s_all": times[2:],
        "collective_share": share,
        "collective_s": share * step,
        "compute_s": (1 - share) * step,
        "rendezvous_share_of_collectives": wait / coll if coll else 0.0,
        "profiled_step_s": profiled_us / 1e6 / profile_steps,
        "replicated": sorted({str(w.message) for w in caught if "replicating" in str(w.message)}),
    }


def child(modes: list[str], steps: int, profile_steps: int) -> None:
    import jax

    modes = modes if jax.device_count() > 1 else modes[:1]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            row = measure(mode, steps, profile_steps, Path(tmp))
            print("ROW " + json.dumps(row), flush=True)


# ---- the table (the parent process) ----------------------------------------------------------


def run_devices(n: int, args) -> list[dict]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    cmd = [sys.executable, __file__, "--child", "--modes", args.modes, "--steps", str(args.steps),
           "--profile-steps", str(args.profile_steps)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{n} devices failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per run")
    ap.add_argument("--profile-steps", type=int, default=2, help="profiled steps per run")
    ap.add_argument("--out", default=str(RESULTS / "scaling.json"), help="where the JSON goes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.modes.split(","), args.steps, args.profile_steps)
    t0 = time.perf_counter()
    rows = []
    for n in map(int, args.devices.split(",")):
        rows += run_devices(n, args)
        print(f"{n} device(s) done, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    base = next((r["step_s_median"] for r in rows if r["devices"] == 1), None)
    head = (
        f"{'devices':>7} {'mode':9} {'step ms':>8} {'vs 1':>5} {'compute ms':>10} "
        f"{'coll ms':>8} {'coll %':>6} {'wait %':>6} {'no wait':>7}"
    )
    print(f"small baseline ({PRESET.relative_to(ROOT)}), simulated CPU devices on "
          f"{os.cpu_count()} cores; median of {args.steps} steps")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['step_s_median'] / base:4.2f}x" if base else "  -  "
        print(
            f"{r['devices']:7d} {r['mode']:9} {r['step_s_median'] * 1e3:8.0f} {ratio:>5} "
            f"{r['compute_s'] * 1e3:10.0f} {r['collective_s'] * 1e3:8.0f} "
            f"{100 * r['collective_share']:5.1f}% "
            f"{100 * r['rendezvous_share_of_collectives']:5.0f}% "
            f"{100 * r['collective_share'] * (1 - r['rendezvous_share_of_collectives']):6.1f}%"
        )
    fsdp8 = [r for r in rows if r["devices"] == 8 and r["mode"] == "fsdp"]
    verdict = None
    if fsdp8:
        share = fsdp8[0]["collective_share"]
        verdict = share <= TARGET
        print(f"8 devices, fsdp: collectives {100 * share:.1f}% of step time "
              f"(target <= {100 * TARGET:.0f}%: {'met' if verdict else 'missed'})")  # fmt: skip
    for r in rows:
        for line in r["replicated"]:
            print(f"  {r['devices']} {r['mode']}: {line}")
    out = {"bench": "scaling", "args": vars(args), "target_met": verdict, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
