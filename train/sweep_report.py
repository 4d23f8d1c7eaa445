"""`menagerie sweep report SWEEP_DIR`: each run's final eval loss and counts, the scaling-law
fits of each arm (`train.sweep_fit`), and their plots, into SWEEP_DIR/report/:

    runs.csv            one row per finished run: arm, budget, N (non-embedding, total), D, C, loss
    fits.json           per arm: Approach 3 (params, bootstrap intervals), Approach 2 (per budget
                        parabolas, N*(C) and D*(C) power laws), and what was left out and why
    loss_vs_flops.png   final loss against training FLOPs, one line per model size
    isoflop.png         loss against N per budget with the fitted parabolas and their minima
    frontier.png        compute-optimal N*(C): Approach 2 minima and power law, Approach 3 curve

One colour per arm. N is the non-embedding parameter count unless `--params total`; D the
tokens trained on; C = flops_per_token(seq_len) x D from the run's own config.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError
from .sweep import Run, is_finished, read_plan
from .sweep_fit import PARAMS, approach3_frontier, fit_approach2, fit_approach3, law

COLUMNS = (
    "name",
    "arm",
    "budget",
    "steps",
    "n_params",
    "n_params_total",
    "tokens",
    "flops",
    "loss",
    "bits_per_byte",
)


def collect(out_dir: Path, runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished run (counts from the run's own config.yaml, the loss of its final
    eval) and the names of the unfinished ones."""
    from rich.console import Console
    from rich.progress import track

    rows, unfinished = [], []
    console = Console(stderr=True)
    for run in track(runs, description="reading runs", console=console, transient=True):
        if not is_finished(run):
            unfinished.append(run.name)
            continue
        rows.append(_row(run))
    return rows, unfinished


def _row(run: Run) -> dict[str, Any]:
    from .checkpoint import CONFIG_FILE
    from .config import build_config, read_yaml, upgrade_saved
    from .metrics import read_metrics

    run_dir = Path(run.overrides["run_dir"])
    cfg = build_config(upgrade_saved(read_yaml(run_dir / CONFIG_FILE)))
    final = read_metrics(run_dir, "eval")[cfg.train.steps]
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    return {
        "name": run.name,
        "arm": run.arm,
        "budget": run.budget,
        "steps": cfg.train.steps,
        "n_params": cfg.model.num_params(include_embeddings=False),
        "n_params_total": cfg.model.num_params(),
        "tokens": tokens,
        "flops": cfg.model.flops_per_token(cfg.train.seq_len) * tokens,
        "loss": final["loss"],
        "bits_per_byte": final.get("bits_per_byte"),
    }


def fit_arm(rows: list[dict], params: str, bootstrap: int) -> dict[str, Any]:
    """Approaches 3 and 2 on one arm's rows; a fit that cannot run says why instead."""
    key = "n_params" if params == "non_embedding" else "n_params_total"
    n = np.array([r[key] for r in rows], np.float64)
    d = np.array([r["tokens"] for r in rows], np.float64)
    loss = np.array([r["loss"] for r in rows], np.float64)
    out: dict[str, Any] = {"params_counted": params, "runs": len(rows)}
    try:
        out["approach3"] = fit_approach3(n, d, loss, bootstrap=bootstrap)
    except ValueError as e:
        out["approach3"] = {"skipped": str(e)}
    if "params" in out["approach3"] and len(rows) < 3 * len(PARAMS):
        out["approach3"]["note"] = (
            f"{len(rows)} runs for {len(PARAMS)} parameters: barely determined, do not "
            "extrapolate (more sizes and budgets narrow the bootstrap intervals)"
        )
    if any(r["budget"] is None for r in rows):
        out["approach2"] = {"skipped": "a grid sweep has no compute budgets (use isoflop:)"}
    else:
        budgets = np.array([r["budget"] for r in rows], np.float64)
        out["approach2"] = fit_approach2(budgets, n, d, loss)
        outside = [b["C"] for b in out["approach2"]["budgets"] if not b["n_parabola"]["inside"]]
        if outside:
            out["approach2"]["note"] = (
                f"the minimum lies outside the sizes swept at C = {outside}: extrapolated; "
                "add sizes on that side"
            )
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def describe(arm: str, fit: dict[str, Any]) -> str:
    """One line per arm: the fitted law and the compute-optimal exponents."""
    parts = [f"{arm} ({fit['runs']} runs)"]
    a3 = fit["approach3"]
    if "params" in a3:
        p, ci = a3["params"], a3.get("intervals", {})

        def show(k: str) -> str:
            band = f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""
            return f"{k}={p[k]:.3g}{band}"

        shown = ", ".join(show(k) for k in ("E", "alpha", "beta", "a_opt"))
        parts.append(f"Approach 3: {shown}" + (" (barely determined)" if "note" in a3 else ""))
    else:
        parts.append(f"Approach 3 skipped: {a3['skipped']}")
    a2 = fit["approach2"]
    if "n_opt" in a2:
        parts.append(
            f"Approach 2: N* ~ C^{a2['n_opt']['exponent']:.3f}, "
            f"D* ~ C^{a2['d_opt']['exponent']:.3f}"
        )
    elif isinstance(a2.get("skipped"), str):
        parts.append(f"Approach 2 skipped: {a2['skipped']}")
    else:
        why = "; ".join(f"C={c}: {w}" for c, w in a2["skipped"].items())
        parts.append(f"Approach 2 needs 2 budgets with a minimum ({why or 'too few budgets'})")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- plots


def plot(report_dir: Path, rows: list[dict], fits: dict[str, dict], params: str) -> list[Path]:
    """The three PNGs (matplotlib, Agg backend); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "n_params" if params == "non_embedding" else "n_params_total"
    arms = list(fits)
    colour = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    paths = []
    for name, draw in (
        ("loss_vs_flops", _draw_loss_vs_flops),
        ("isoflop", _draw_isoflop),
        ("frontier", _draw_frontier),
    ):
        fig, ax = plt.subplots(figsize=(7, 5))
        draw(ax, rows, fits, colour, key)
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(report_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        paths.append(report_dir / f"{name}.png")
    return paths


def _draw_loss_vs_flops(ax, rows, fits, colour, key) -> None:
    markers = "osD^v<>ph*"
    for arm in fits:
        sizes = sorted({r[key] for r in rows if r["arm"] == arm})
        for i, size in enumerate(sizes):
            pts = sorted(
                (r["flops"], r["loss"]) for r in rows if r["arm"] == arm and r[key] == size
            )
            x, y = zip(*pts, strict=True)
            marker = markers[i % len(markers)]
            label = f"{arm} N={size:.3g}"
            ax.plot(x, y, marker=marker, color=colour[arm], alpha=0.8, label=label)
            law_params = fits[arm]["approach3"].get("params")
            if law_params:  # the fitted law along this size's runs: D = C / FLOPs per token
                mine = [r for r in rows if r["arm"] == arm and r[key] == size]
                per_token = mine[0]["flops"] / mine[0]["tokens"]
                grid = np.geomspace(min(x), max(x), 30)
                fitted = law(law_params, np.full_like(grid, size), grid / per_token)
                ax.plot(grid, fitted, ":", color=colour[arm], alpha=0.6)
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("final eval loss")
    ax.set_title("loss against compute, one line per model size (dotted: Approach 3 fit)")


def _draw_isoflop(ax, rows, fits, colour, key) -> None:
    for arm, fit in fits.items():
        mine = [r for r in rows if r["arm"] == arm and r["budget"] is not None]
        parabolas = {b["C"]: b["n_parabola"] for b in fit["approach2"].get("budgets", [])}
        for c in sorted({r["budget"] for r in mine}):
            pts = sorted((r[key], r["loss"]) for r in mine if r["budget"] == c)
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, "o", color=colour[arm], alpha=0.8)
            if c in parabolas:
                c2, c1, c0 = parabolas[c]["coef"]
                grid = np.geomspace(min(x) / 1.5, max(x) * 1.5, 100)
                ax.plot(grid, np.polyval([c2, c1, c0], np.log(grid)), color=colour[arm], lw=1)
                ax.plot(parabolas[c]["opt"], parabolas[c]["loss"], "*", ms=12, color=colour[arm])
            ax.annotate(f"C={c:.2g}", (x[0], y[0]), fontsize=7, color=colour[arm])
        ax.plot([], [], "o-", color=colour[arm], label=f"{arm} (star: parabola minimum)")
    ax.set_xlabel(f"parameters N ({key.replace('_', ' ')})")
    ax.set_ylabel("final eval loss")
    ax.set_title("isoFLOP curves")


def _draw_frontier(ax, rows, fits, colour, key) -> None:
    budgets = [r["budget"] for r in rows if r["budget"] is not None] or [r["flops"] for r in rows]
    grid = np.geomspace(min(budgets) / 3, max(budgets) * 30, 50)
    for arm, fit in fits.items():
        a2, a3 = fit["approach2"], fit["approach3"]
        per_budget = a2.get("budgets", [])
        if per_budget:
            cs = [b["C"] for b in per_budget]
            n_opts = [b["n_parabola"]["opt"] for b in per_budget]
            ax.plot(cs, n_opts, "o", color=colour[arm], label=f"{arm}: Approach 2 minima")
        if "n_opt" in a2:
            k, e = a2["n_opt"]["k"], a2["n_opt"]["exponent"]
            ax.plot(grid, k * grid**e, color=colour[arm], label=f"{arm}: N* ~ C^{e:.2f}")
        if "params" in a3:
            n_opt, _ = approach3_frontier(a3["params"], grid)
            e3 = a3["params"]["a_opt"]
            ax.plot(grid, n_opt, "--", color=colour[arm], label=f"{arm}: Approach 3, C^{e3:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("compute-optimal N*")
    ax.set_title("fitted frontier (Approach 3 assumes C = 6 N D)")


# ----------------------------------------------------------------------------- command


def report(out_dir: Path, params: str = "non_embedding", bootstrap: int = 100) -> dict[str, Any]:
    """Collects, fits, writes; returns the fits.json content."""
    runs = read_plan(out_dir)
    rows, unfinished = collect(out_dir, runs)
    if not rows:
        raise ConfigError(
            f"no run of the sweep in '{out_dir}' has finished; run `menagerie sweep run` first"
        )
    report_dir = out_dir / "report"
    report_dir.mkdir(exist_ok=True)
    fits = {
        arm: fit_arm([r for r in rows if r["arm"] == arm], params, bootstrap)
        for arm in dict.fromkeys(r["arm"] for r in rows)
    }
    for arm, fit in fits.items():
        a3 = fit["approach3"].get("params")
        if a3:
            mine = [r for r in rows if r["arm"] == arm]
            key = "n_params" if params == "non_embedding" else "n_params_total"
            pred = law(
                a3,
                np.array([r[key] for r in mine], float),
                np.array([r["tokens"] for r in mine], float),
            )
            fit["approach3"]["rms_log_residual"] = float(
                math.sqrt(np.mean((np.log(pred) - np.log([r["loss"] for r in mine])) ** 2))
            )
    out = {"runs": len(runs), "finished": len(rows), "unfinished": unfinished, "arms": fits}
    write_csv(report_dir / "runs.csv", rows)
    (report_dir / "fits.json").write_text(json.dumps(out, indent=1))
    plot(report_dir, rows, fits, params)
    return out


def cmd_report(args) -> int:
    """`menagerie sweep report`."""
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap} must be >= 0")
    out_dir = Path(args.sweep_dir)
    out = report(out_dir, args.params, args.bootstrap)
    left = out["unfinished"]
    if left:
        more = ", ..." if len(left) > 3 else ""
        print(f"note: {len(left)} runs not finished, left out: {', '.join(left[:3])}{more}")
    for arm, fit in out["arms"].items():
        print(describe(arm, fit))
    names = "runs.csv, fits.json, loss_vs_flops.png, isoflop.png, frontier.png"
    print(f"wrote {out_dir / 'report'}: {names}")
    return 0
