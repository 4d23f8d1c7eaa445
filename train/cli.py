"""The `menagerie` command.

    menagerie train   [--config FILE] [--start-over] [key.sub=value ...]
    menagerie eval    [--config FILE] [key.sub=value ...]
    menagerie prepare [--config FILE] --out DIR [--force] [key.sub=value ...]
    menagerie export  RUN_DIR --format hf|megalodon|mosaics|torch --out DIR [--step N]
                      [--dtype bfloat16] [--verify]
    menagerie import-hf MODEL_DIR [key.sub=value ...] --out RUN_DIR
    menagerie convert-lte RUN_DIR --out NEW_RUN_DIR [--step N] [key.sub=value ...]
    menagerie generate RUN_DIR --prompt TEXT [--max-new-tokens N --temperature T --top-k K
                       --top-p P --seed S --step N]
    menagerie sweep run SWEEP.yaml [--out DIR] [--jobs N] [--emit slurm|commands --nodes N]
    menagerie sweep report SWEEP_DIR [--params non_embedding|total] [--bootstrap N]
    menagerie plan    [--config FILE] [--devices N --device-memory 80GB] [--json] [key=value ...]

Errors in what the user gave (config, data, run directory, checkpoint) print one line and exit
with status 2; `--debug` shows the traceback instead. Multi-process (multi-host) runs start one
such command per process with MENAGERIE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID set (see
`train.distributed`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from menagerie.kernels.dispatch import KernelUnsupportedError

from .errors import USER_ERRORS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="menagerie", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", "-c", help="YAML preset (see configs/); defaults apply without")
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=200")

    t = sub.add_parser("train", help="train (or resume) a model")
    common(t)
    t.add_argument(
        "--start-over",
        action="store_true",
        help="if run_dir holds another run, move it aside and start afresh",
    )
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of a run on validation data")
    common(e)
    pr = sub.add_parser("prepare", help="tokenize a data source into ArrayRecord shards")
    common(pr)
    pr.add_argument("--out", required=True, help="output folder (must be empty or new)")
    pr.add_argument("--force", action="store_true", help="write into a non-empty folder")
    from menagerie.export import FORMATS

    x = sub.add_parser("export", help="write a run's checkpoint in another format")
    x.add_argument("run_dir", help="folder of a trained run")
    x.add_argument("--format", required=True, choices=sorted(FORMATS), help="output format")
    x.add_argument("--out", required=True, help="output folder (must be new or empty)")
    x.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    x.add_argument(
        "--verify", action="store_true", help="compare logits with the run (hf, torch, mosaics)"
    )
    x.add_argument("--debug", action="store_true", help="show tracebacks")
    i = sub.add_parser("import-hf", help="make a run of a local Hugging Face Llama checkpoint")
    i.add_argument("model_dir", help="Hugging Face model folder (config.json, safetensors)")
    i.add_argument("--out", required=True, help="run folder to create (must be new or empty)")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    i.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    c = sub.add_parser("convert-lte", help="start an LTE run from a trained dense run")
    c.add_argument("run_dir", help="folder of a trained run with a swiglu or mlp FFN")
    c.add_argument("--out", required=True, help="run folder to create (must be new or empty)")
    c.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    c.add_argument("--debug", action="store_true", help="show tracebacks")
    c.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.ffn.eta=0.5")
    _generate_parser(sub)
    _sweep_parser(sub)
    _plan_parser(sub, common)
    return p


def _plan_parser(sub, common) -> None:
    pl = sub.add_parser(
        "plan",
        help="per-device memory of a config's training step, without allocating",
        description="Simulate N devices here with XLA_FLAGS=--xla_force_host_platform_device_count"
        "=N (then XLA's compiled memory analysis is shown too), or plan for --devices N abstract "
        "ones.",
    )
    common(pl)
    pl.add_argument("--devices", type=int, help="plan for N devices that are not here (abstract)")
    pl.add_argument("--device-memory", help="memory of one device, e.g. 80GB: says if it fits")
    pl.add_argument("--no-compile", action="store_true", help="skip XLA's memory analysis")
    pl.add_argument("--json", action="store_true", help="one JSON object of the numbers")


def _sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="scaling-law sweeps: run a grid or isoFLOP ladder, fit laws")
    ssub = s.add_subparsers(dest="sweep_command", required=True)
    r = ssub.add_parser("run", help="train a sweep's unfinished runs, or emit their commands")
    r.add_argument("sweep_file", help="sweep YAML (see configs/sweeps/)")
    r.add_argument("--out", help="sweep folder (default: the file's out_dir, else sweeps/NAME)")
    r.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    r.add_argument("--emit", choices=["slurm", "commands"], help="write commands, run nothing")
    r.add_argument("--nodes", type=int, default=1, help="--emit slurm: nodes per run")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    p = ssub.add_parser("report", help="collect a sweep's losses, fit scaling laws, plot")
    p.add_argument("sweep_dir", help="folder `sweep run` wrote")
    p.add_argument("--params", choices=["non_embedding", "total"], default="non_embedding")
    p.add_argument("--bootstrap", type=int, default=100, help="Approach 3 bootstrap refits")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a trained run (streamed)")
    g.add_argument("run_dir", help="folder of a trained run")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="0 or less: greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus probability (1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def _load(args):
    from .config import build_config, read_yaml

    raw = read_yaml(args.config) if args.config else {}
    return build_config(raw, args.overrides)


def cmd_train(args) -> int:
    from .trainer import Trainer, describe_eval

    cfg = _load(args)
    summary = Trainer(cfg, start_over=args.start_over).run()
    if summary.preempted:
        return 0
    if summary.eval:
        print(f"final eval: {describe_eval(summary.eval)}")
    if summary.sample is not None:
        print("sample:\n" + summary.sample)
    return 0


def cmd_eval(args) -> int:
    from .checkpoint import CONFIG_FILE, Checkpointer
    from .config import build_config, read_yaml, upgrade_saved
    from .errors import CheckpointError
    from .trainer import Trainer, describe_eval

    cfg = _load(args)
    saved = Path(cfg.run_dir) / CONFIG_FILE
    if not saved.is_file():
        raise CheckpointError(
            f"run_dir '{cfg.run_dir}' holds no run ({CONFIG_FILE} missing); "
            "pass the run_dir of a trained run (run_dir=...)"
        )
    if args.config:
        print(
            f"eval: reading the run's own {saved}; '{args.config}' only chose its run_dir "
            "(pass overrides such as train.eval_batches=8 to change the evaluation)"
        )
    cfg = build_config(upgrade_saved(read_yaml(saved)), args.overrides)
    trainer = Trainer(cfg)
    ckpt = Checkpointer(
        trainer.run_dir,
        every=0,
        keep_last=cfg.checkpoint.keep_last,
        keep_every=cfg.checkpoint.keep_every,
        async_save=False,
    )
    try:
        restored = ckpt.restore_latest(trainer.abstract_state())
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointError(f"run_dir '{cfg.run_dir}' has no checkpoint yet; train first")
    state, meta = restored
    eval_step = trainer.jit_eval_step()
    with trainer.context():
        ev = trainer.evaluate(state, eval_step)
    over = f"{int(ev['tokens'])} tokens"
    if "sequences" in ev:
        over = f"{int(ev['tokens'])} answer tokens in {int(ev['sequences'])} sequences"
    print(f"step {meta['step']}: eval {describe_eval(ev)} over {over}")
    return 0


def cmd_prepare(args) -> int:
    from menagerie.data import prepare

    cfg = _load(args)
    out = prepare(cfg.data, Path(args.out), force=args.force)
    print(f"prepared {cfg.data.source!r} with tokenizer {cfg.data.tokenizer!r} into {out}")
    return 0


def cmd_export(args) -> int:
    from menagerie.export import export_run

    out = export_run(
        args.run_dir, args.format, args.out, step=args.step, dtype=args.dtype, verify=args.verify
    )
    print(f"wrote {args.format} export of {args.run_dir} to {out}")
    return 0


def cmd_import_hf(args) -> int:
    from menagerie.export.hf_import import describe, import_hf

    print(describe(import_hf(args.model_dir, args.out, args.overrides)))
    return 0


def cmd_convert_lte(args) -> int:
    from .convert import convert_to_lte, describe

    out = convert_to_lte(args.run_dir, args.out, step=args.step, overrides=args.overrides)
    print(describe(out))
    return 0


def cmd_generate(args) -> int:
    from menagerie.export.run import load_run

    from .errors import ConfigError
    from .generate import generate

    if args.max_new_tokens < 1 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(
            f"--max-new-tokens {args.max_new_tokens}, --top-k {args.top_k}, --top-p "
            f"{args.top_p}: need max-new-tokens >= 1, top-k >= 0 and 0 < top-p <= 1"
        )
    run = load_run(args.run_dir, args.step)
    print(args.prompt, end="", flush=True)
    times: list[float] = []
    options = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
    generate(
        run,
        args.prompt,
        on_text=lambda text: print(text, end="", flush=True),
        times=times,
        **{k: getattr(args, k) for k in options},
    )
    print()
    rate = f", {(len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s" if len(times) > 2 else ""
    print(f"[{len(times)} tokens from step {run.step}{rate} after the first two]", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    if args.sweep_command == "run":
        from .sweep import cmd_run

        return cmd_run(args)
    from .sweep_report import cmd_report

    return cmd_report(args)


def cmd_plan(args) -> int:
    from .plan import cmd_plan as run

    return run(args)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; dotted overrides may also come after options (argparse stops taking a
    positional list at the first option: `convert-lte RUN --step 5 a=1 --out X`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _distributed(handler):
    def run(args) -> int:
        from .distributed import initialize

        initialize()  # before anything touches a JAX backend
        return handler(args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    handler = {
        "train": _distributed(cmd_train),
        "eval": _distributed(cmd_eval),
        "prepare": cmd_prepare,
        "export": cmd_export,
        "import-hf": cmd_import_hf,
        "convert-lte": cmd_convert_lte,
        "generate": cmd_generate,
        "sweep": cmd_sweep,
        "plan": cmd_plan,
    }[args.command]
    if args.debug:
        return handler(args)
    try:
        return handler(args)
    except (*USER_ERRORS, KernelUnsupportedError) as e:  # a kernel the device lacks: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Trainer.run's Interrupted says what it saved
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
