"""The training loop: data -> jitted, donated train step -> metrics -> eval -> checkpoints.

    summary = Trainer(cfg).run()

Everything that decides the numbers (initialisation, data order, the step) is a pure function of
the config and the step index, so a run killed at any point and rerun resumes bit for bit from
its latest checkpoint (on the same hardware and software).
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from menagerie import arch
from menagerie.data import open_datasets
from menagerie.data.prepare import cache_root
from rich.console import Console
from rich.markup import escape

from . import lowrank
from . import mesh as mesh_lib
from .checkpoint import Checkpointer, RunLock, prepare_run_dir, record_data_change
from .config import RunConfig, check_mesh_fits
from .distributed import from_process_0, peer_failures, preemption_reached, progress
from .errors import CheckpointError, ConfigError, Interrupted, TrainingError
from .generate import sample
from .metrics import MetricsWriter, device_peak_flops
from .optim import make_optimizer, opt_state_logical_names
from .step import eval_report, make_eval_step, make_train_step


@dataclass
class Summary:
    """What a run did; returned by `Trainer.run` and printed by the CLI."""

    run_dir: Path
    start_step: int
    final_step: int
    last_loss: float | None = None
    eval: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    preempted: bool = False
    """Stopped by SIGTERM after saving (a Ctrl-C raises `Interrupted` instead)."""
    sample: str | None = None


class _StopSignals:
    """SIGTERM (a preemption) or a first Ctrl-C (SIGINT) stops the run at a step boundary after a
    save (SIGTERM: the run returns, exit 0; Ctrl-C: `Interrupted`, exit 130). A Ctrl-C after
    that aborts at once.

    With several processes (`shared`) all must stop at the same step, since the save is
    collective: a SIGTERM to any of them is JAX's preemption notice (its own handler, installed
    by `jax.distributed.initialize`, stays in place), which `distributed.preemption_reached`
    turns into one step for all; a Ctrl-C is passed on as that notice."""

    def __init__(self, shared: bool = False):
        self.shared = shared
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            if signum == signal.SIGINT and self.requested is not None:
                raise KeyboardInterrupt
            self.requested = self.requested or signal.Signals(signum).name
            if self.shared:
                signal.raise_signal(signal.SIGTERM)  # to JAX's handler: a notice to all

        for sig in (signal.SIGINT,) if self.shared else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner's thread)
                pass
        return self

    def stop_after(self, iteration: int) -> str | None:
        """The signal that stops the run after loop `iteration` (1, 2, ... in this process;
        not the step: JAX's sync point counts from 0 whenever the notice came, even before the
        loop); None to go on. The same on every process."""
        if not self.shared:
            return self.requested
        return (self.requested or "SIGTERM") if preemption_reached(iteration) else None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """One training run of a `RunConfig`: the mesh, the datasets, the abstract model and the
    shardings of its state are set up on construction (which prepares the data and the run
    directory); `run` trains from the latest checkpoint, or from scratch, to `train.steps`.

    The pieces are usable on their own: `init_state`, `abstract_state`, `jit_train_step`,
    `jit_eval_step`, `evaluate` and `sample`, inside `context()` (mesh and axis rules).
    """

    def __init__(self, cfg: RunConfig, *, start_over: bool = False, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.mesh: Mesh = mesh_lib.make_mesh(cfg.mesh)
        check_mesh_fits(cfg, mesh_lib.data_parallel_size(self.mesh), self.mesh.shape["sequence"])

        # Data first: the tokenizer (a synthetic task's own) fixes the model's vocabulary.
        self.train_data, self.val_data = open_datasets(cfg.data, cfg.train.seq_len)
        self.tokenizer = self.train_data.tokenizer
        self._set_up_state(cfg, self.tokenizer.vocab_size)
        if self.cfg.optim.uses_lapack and jax.default_backend() == "cpu":
            # XLA:CPU already uses every core; LAPACK's own thread pool on top of it slows the
            # SVD refreshes and the steps after them (train.lowrank.limit_cpu_lapack_threads).
            lowrank.limit_cpu_lapack_threads(1)
        # Last: everything that can be checked was, so a refused config writes nothing.
        self.run_dir = prepare_run_dir(self.cfg, start_over=start_over)

    @classmethod
    def layout_only(cls, cfg: RunConfig, mesh: Any, tokenizer_vocab: int) -> Trainer:
        """A Trainer without data or run folder: `mesh` (a Mesh, or an AbstractMesh for devices
        that are not here), the abstract model, the optimizer and the shardings of the state,
        so `abstract_state` and `jit_train_step` work; nothing is allocated or written. For
        memory planning and ahead-of-time compilation (`train.plan`)."""
        self = cls.__new__(cls)
        self.console = Console(highlight=False, soft_wrap=True)
        self.mesh = mesh
        check_mesh_fits(cfg, mesh_lib.data_parallel_size(mesh), mesh.shape["sequence"])
        self._set_up_state(cfg, tokenizer_vocab)
        return self

    # ------------------------------------------------------------------ state

    def _set_up_state(self, cfg: RunConfig, tokenizer_vocab: int) -> None:
        """The model (abstract first, so shardings are known before anything is allocated), the
        optimizer and the shardings of the state and of a batch, on `self.mesh`."""
        try:
            model_cfg = cfg.model.with_vocab(tokenizer_vocab)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.cfg = cfg.model_copy(update={"model": model_cfg})
        abstract_model = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_state = nnx.split(abstract_model)
        self.param_names = mesh_lib.logical_names(abstract_state)
        abstract_params = nnx.to_pure_dict(abstract_state)
        self.param_shardings = mesh_lib.shardings_for(self.param_names, abstract_params, self.mesh)
        self.optimizer, self.schedule = make_optimizer(
            self.cfg.optim, self.cfg.train.steps, self.param_names
        )
        self.state_shardings = self._state_shardings(abstract_params)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)

    def _state_shardings(self, abstract_params: Any) -> dict:
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        repl = mesh_lib.replicated(self.mesh)
        # Low-rank optimizers name their state's axes; for the others (None) the leaves that
        # mirror a parameter take its sharding.
        opt_names = opt_state_logical_names(
            self.cfg.optim, abstract_opt, abstract_params, self.param_names
        )
        opt_shardings = mesh_lib.opt_state_shardings(
            abstract_opt, abstract_params, self.param_shardings, self.mesh, opt_names
        )
        return {
            "step": repl,
            "params": self.param_shardings,
            "opt_state": opt_shardings,
            "bad_steps": repl,
            "skipped": repl,
        }

    def init_state(self) -> dict:
        model_cfg = self.cfg.model

        def init(key):
            model = arch.build(model_cfg, rngs=nnx.Rngs(params=key))
            return self._fresh_state(nnx.to_pure_dict(nnx.split(model)[1]))

        key = jax.random.key(self.cfg.train.seed)
        return jax.jit(init, out_shardings=self.state_shardings)(key)

    def _fresh_state(self, params: dict) -> dict:
        """Step 0 of training `params`: a fresh optimizer state, the counters at zero."""
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": self.optimizer.init(params),
            "bad_steps": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    def save_initial(self, params: dict) -> None:
        """Checkpoint 0 of this run holding `params` (a pure dict shaped like the model's) and
        a fresh optimizer state: how imported or hand-made weights become a run that `train`
        continues and `export` reads."""
        with self.context():
            state = jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)
        c = self.cfg.checkpoint
        with Checkpointer(
            self.run_dir, every=0, keep_last=c.keep_last, keep_every=c.keep_every, async_save=False
        ) as ckpt:
            ckpt.prepare_writes()
            ckpt.save(0, state, self._meta(0), force=True)

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(self.init_state)
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings,
        )

    def jit_train_step(self):
        """The jitted, donated train step: (state, global batch) -> (state, metrics)."""
        t = self.cfg.train
        step = make_train_step(
            self.graphdef,
            self.optimizer,
            self.schedule,
            microbatches=t.microbatches,
            z_loss=t.z_loss,
            clip_norm=self.cfg.optim.clip_norm,
            update_rules=self.update_rules(),
        )
        return jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=0,
        )

    def update_rules(self) -> list[tuple[Any, Any]]:
        """(mask, rule) per axis of `ModelConfig.update_rules`, the mask True for the parameters
        that carry the axis."""
        rules = self.cfg.model.update_rules().items()
        return [(_carrying(self.param_names, axis), rule) for axis, rule in rules]

    def jit_eval_step(self):
        token_bytes = jnp.asarray(self.tokenizer.token_bytes, jnp.float32)
        return jax.jit(
            make_eval_step(self.graphdef, token_bytes, greedy=self.cfg.data.is_synthetic),
            in_shardings=(self.param_shardings, self.batch_sharding, self.state_shardings["step"]),
        )

    # ------------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def context(self):
        """The mesh and the logical-axis rules, active while steps are traced and run."""
        with jax.set_mesh(self.mesh), mesh_lib.axis_rules(self.mesh):
            yield

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        B = self.cfg.train.batch_size
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v, (B, *v.shape[1:]))
            for k, v in local.items()
        }

    def _meta(self, step: int) -> dict:
        t = self.cfg.train
        return {
            "data": {
                "next_batch": step,
                "seed": t.seed,
                "batch_size": t.batch_size,
                "seq_len": t.seq_len,
            },
            "layout": {
                "scan_layers": self.cfg.model.scan_layers,
                "param_dtype": self.cfg.model.param_dtype,
                "mesh": dict(self.mesh.shape),
                "process_count": jax.process_count(),
            },
            "config": self.cfg.model_dump(mode="json"),
            "versions": {"jax": jax.__version__},
        }

    def evaluate(self, state: dict, eval_step) -> dict[str, float]:
        """`eval_report` of `train.eval_batches` validation batches of the model in `state` (its
        params at its step): loss and bits per byte, or for a synthetic task loss and
        exact-match accuracies on its answers."""
        t = self.cfg.train
        sums: dict[str, float] = {}
        batches = self.val_data.eval_batches(
            t.batch_size,
            t.eval_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for local in batches:
            batch = self._global_batch(local)
            out = jax.device_get(eval_step(state["params"], batch, state["step"]))
            progress()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return eval_report(sums, exact_match=self.cfg.data.is_synthetic)

    # ------------------------------------------------------------------ loop

    def run(self) -> Summary:
        """Trains from the latest checkpoint (or from scratch) to `train.steps`, holding the run
        folder's lock. SIGTERM: saves at the next step boundary and returns with
        `summary.preempted`; Ctrl-C: saves the same way, then raises `Interrupted` (a second
        Ctrl-C aborts at once). With several processes, a signal to any of them stops all at one
        step (`_StopSignals`), and an error first waits until the others are seen alive
        (`distributed.peer_failures`: a lost one is named in one line instead)."""
        with peer_failures(), self._run_lock(), self._checkpointer() as ckpt:
            ckpt.prepare_writes()
            state, start = self._restore_or_init(ckpt)
            if jax.process_index() == 0:
                record_data_change(self.run_dir, self.cfg, start, warn=self._warn)
            summary, stopped_by = self._train(ckpt, state, start)
        if stopped_by == "SIGINT":
            raise Interrupted(
                f"saved step {summary.final_step} to {ckpt.directory}; "
                "rerun the same command to resume"
            )
        return summary

    def _train(self, ckpt: Checkpointer, state: dict, start: int) -> tuple[Summary, str | None]:
        """The loop from `start`: (summary, the signal that stopped it after a save or None)."""
        cfg, t = self.cfg, self.cfg.train
        train_step = self.jit_train_step()
        eval_step = self.jit_eval_step()
        meter = _Throughput(t.batch_size * t.seq_len, *self._print_banner())
        summary = Summary(run_dir=self.run_dir, start_step=start, final_step=start)
        batches = self.train_data.batches(
            t.batch_size,
            seed=t.seed,
            start_step=start,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        step, stopped_by = start, None
        bar = _ProgressBar(self.console, cfg, start)
        with MetricsWriter(self.run_dir, tensorboard=cfg.log.tensorboard) as writer:
            with _StopSignals(jax.process_count() > 1) as stop, self.context(), bar:
                while step < t.steps:
                    state, m = train_step(state, self._global_batch(next(batches)))
                    step += 1
                    m = jax.device_get(m)
                    progress(step)
                    meter.add()
                    summary.last_loss = float(m["loss"])
                    bar(step, summary.last_loss)
                    # Every skipped step is logged, then counted.
                    if step % cfg.log.every == 0 or step == t.steps or not m["finite"]:
                        self._log_train(writer, step, m, meter)
                    self._check_finite(step, m, ckpt)
                    if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                        self._log_eval(writer, step, self.evaluate(state, eval_step))
                        meter.restart_clock()
                    ckpt.save(step, state, self._meta(step))
                    if stopped_by := stop.stop_after(step - start):
                        self._save_and_stop(ckpt, step, state, stopped_by)
                        break
            summary.final_step = step
            summary.skipped_steps = int(jax.device_get(state["skipped"]))
            summary.preempted = stopped_by == "SIGTERM"
            if not stopped_by:
                self._finish(ckpt, writer, state, eval_step, summary)
            ckpt.wait()
        return summary, stopped_by

    def _save_and_stop(self, ckpt: Checkpointer, step: int, state: dict, signame: str) -> None:
        ckpt.save(step, state, self._meta(step), force=True)
        ckpt.wait()
        n, where = jax.process_count(), ckpt.directory
        if signame == "SIGTERM" and n == 1:
            self.console.print(f"SIGTERM: saved step {step} to {where}; exiting")
        elif signame == "SIGTERM":
            self.console.print(
                f"preemption notice (SIGTERM or Ctrl-C to one of the {n} processes): saved step "
                f"{step} to {where}; all {n} stop at this step"
            )

    @contextlib.contextmanager
    def _run_lock(self):
        """Process 0 holds the run folder's lock while the run trains in it (`RunLock`); every
        process learns from process 0 whether it got it, so that none waits for a process that
        stopped."""
        lock, error = RunLock(self.run_dir), None
        if jax.process_index() == 0:
            try:
                lock.acquire(warn=self._warn)
            except CheckpointError as e:
                error = e
        if not from_process_0(error is None):
            raise error or CheckpointError(
                f"process 0 could not lock run_dir '{self.run_dir}'; its error says why"
            )
        with lock:
            yield

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]{escape(message)}")

    def _checkpointer(self) -> Checkpointer:
        c = self.cfg.checkpoint
        return Checkpointer(
            self.run_dir,
            every=c.every,
            keep_last=c.keep_last,
            keep_every=c.keep_every,
            async_save=c.async_save,
        )

    def _restore_or_init(self, ckpt: Checkpointer) -> tuple[dict, int]:
        """The latest readable checkpoint's state and step, else a fresh state at step 0."""
        t, console = self.cfg.train, self.console
        restored = ckpt.restore_latest(self.abstract_state(), warn=self._warn, training=True)
        if restored is None:
            return self.init_state(), 0
        state, meta = restored
        start = int(jax.device_get(state["step"]))
        old = meta.get("data", {})
        if (old.get("batch_size"), old.get("seq_len"), old.get("seed")) != (
            t.batch_size,
            t.seq_len,
            t.seed,
        ):
            console.print(
                "[yellow]batch size, sequence length or seed changed since the "
                "checkpoint: the data order from here differs from the original run"
            )
        console.print(f"resumed from {ckpt.directory / str(start)} (step {start})")
        return state, start

    def _print_banner(self) -> tuple[float, float]:
        """Prints the model, devices and peak FLOP/s; returns (FLOPs per token, the peak FLOP/s
        that MFU divides by)."""
        cfg = self.cfg
        peak, peak_src = device_peak_flops(cache_dir=cache_root(cfg.data))
        n_dev = jax.device_count()
        # On CPU the measured peak is the whole host's (simulated devices share its cores).
        peak_units = jax.process_count() if jax.devices()[0].platform == "cpu" else n_dev
        flops_per_token = cfg.model.flops_per_token(cfg.train.seq_len)
        self.console.print(
            f"model {cfg.model.family}: {cfg.model.num_params() / 1e6:.2f}M params, "
            f"{flops_per_token / 1e6:.1f} MFLOP/token; {n_dev} {jax.devices()[0].platform} "
            f"device(s), mesh {dict(self.mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s/device "
            f"({peak_src}); run_dir {self.run_dir}"
        )
        return flops_per_token, peak * peak_units

    def _check_finite(self, step: int, m: dict, ckpt: Checkpointer) -> None:
        """Reports a skipped non-finite step; TrainingError after `max_bad_steps` in a row."""
        if bool(m["finite"]):
            return
        self._warn(
            f"step {step}: non-finite loss, gradient or update "
            f"(loss={float(m['loss'])}); update skipped"
        )
        if int(m["bad_steps"]) >= self.cfg.train.max_bad_steps:
            ckpt.wait()
            raise TrainingError(
                f"{int(m['bad_steps'])} non-finite steps in a row, the last at "
                f"step {step} (data batch {step - 1}); lower optim.lr or check "
                f"the data; no non-finite update was applied or saved: {ckpt.resume_point()}"
            )

    def _log_train(self, writer: MetricsWriter, step: int, m: dict, meter: _Throughput) -> None:
        """One train metrics row (the step's metrics and the window's throughput); restarts
        the window."""
        row = dict(m)
        row.update(meter.row())
        saved = [v for k, v in m.items() if k.endswith("/flops_saved")]
        if saved:  # a sparse part: the FLOPs its active neurons need beside the dense count
            row["active_flops_per_token"] = meter.flops_per_token - float(sum(saved))
        writer.write(step, row)
        self.console.print(_format_row(step, self.cfg.train.steps, row))
        meter.reset()

    def _log_eval(self, writer: MetricsWriter, step: int, ev: dict[str, float]) -> None:
        writer.write(step, ev, kind="eval")
        self.console.print(f"eval  step {step}: {describe_eval(ev, '  ')}")

    def _finish(
        self, ckpt: Checkpointer, writer: MetricsWriter, state: dict, eval_step, summary: Summary
    ) -> None:
        """After the last step of a run that was not preempted: the final checkpoint, the final
        eval and the sample."""
        t, step = self.cfg.train, summary.final_step
        ckpt.save(step, state, self._meta(step), force=True)
        if t.eval_batches:
            with self.context():
                summary.eval = self.evaluate(state, eval_step)
            self._log_eval(writer, step, summary.eval)
        # A single-process sampler, of text: a synthetic task has no text prompt.
        if t.sample_tokens and jax.process_count() == 1 and not self.cfg.data.is_synthetic:
            summary.sample = self.sample(state["params"])

    def sample(self, params: Any) -> str:
        t = self.cfg.train
        prompt = self.tokenizer.encode(t.sample_prompt)
        with self.context():
            ids = sample(
                self.graphdef,
                params,
                prompt,
                max_new_tokens=t.sample_tokens,
                window=min(t.seq_len, len(prompt) + t.sample_tokens),
                temperature=t.sample_temperature,
                seed=t.seed,
                stop_id=self.tokenizer.eos_id,
            )
        return t.sample_prompt + self.tokenizer.decode(ids)


class _Throughput:
    """Step time, tokens/s and MFU over a window of steps; the run's first step (it compiles)
    is left out. `reset` starts a new window, `add` counts one step."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.first_step_done = False
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.tokens = time.perf_counter(), 0, 0

    def restart_clock(self) -> None:
        """Leaves the time since `t0` out of the window (an eval); the steps counted stay."""
        self.t0 = time.perf_counter()

    def add(self) -> None:
        self.steps += 1
        self.tokens += self.tokens_per_step
        if not self.first_step_done:
            self.first_step_done = True
            self.reset()

    def row(self) -> dict[str, float]:
        """step_time (s), tokens_per_s and mfu of the window; empty if it holds no steps."""
        dt = time.perf_counter() - self.t0
        if not (self.steps and dt > 0):
            return {}
        tps = self.tokens / dt
        return {
            "step_time": dt / self.steps,
            "tokens_per_s": tps,
            "mfu": tps * self.flops_per_token / self.peak_flops,
        }


def _carrying(param_names: Any, axis: str) -> Any:
    """A pytree like the parameters: True where a parameter's logical names include `axis`."""
    return jax.tree.map(lambda names: axis in names, param_names, is_leaf=_is_names)


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple)


def describe_eval(ev: dict[str, float], sep: str = ", ") -> str:
    """An `eval_report` as text: "loss 2.1000, bits/byte 3.0000", or for a synthetic task "loss
    0.2000, accuracy 0.9500, sequence accuracy 0.7500, greedy accuracy 0.9000, greedy sequence
    accuracy 0.6000" (teacher-forced, then decoded greedily); with a planner head, its plan's
    accuracy and block accuracy (each block decoded in parallel from its plan), and with its
    writer the block accuracy of what it writes greedily."""
    parts = [f"loss {ev['loss']:.4f}"]
    if "bits_per_byte" in ev:
        parts.append(f"bits/byte {ev['bits_per_byte']:.4f}")
    if "accuracy" in ev:
        parts.append(f"accuracy {ev['accuracy']:.4f}")
        parts.append(f"sequence accuracy {ev['sequence_accuracy']:.4f}")
    if "greedy_accuracy" in ev:
        parts.append(f"greedy accuracy {ev['greedy_accuracy']:.4f}")
        parts.append(f"greedy sequence accuracy {ev['greedy_sequence_accuracy']:.4f}")
    if "model/head/lookahead_block_accuracy" in ev:
        parts.append(f"plan accuracy {ev['model/head/lookahead_accuracy']:.4f}")
        parts.append(f"plan block accuracy {ev['model/head/lookahead_block_accuracy']:.4f}")
    if "model/head/writer_block_accuracy" in ev:
        parts.append(f"written block accuracy {ev['model/head/writer_block_accuracy']:.4f}")
    return sep.join(parts)


def _format_row(step: int, total: int, row: dict) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {row['loss']:.4f}",
        f"gnorm {row['grad_norm']:.3f}",
        f"lr {row['lr']:.2e}",
    ]
    if "tokens_per_s" in row:
        parts += [
            f"tok/s {row['tokens_per_s']:,.0f}",
            f"step {row['step_time'] * 1e3:.0f}ms",
            f"MFU {100 * row['mfu']:.1f}%",
        ]
    return "  ".join(parts)


class _ProgressBar:
    """A rich progress bar on a terminal; nothing otherwise (log lines carry the numbers)."""

    def __init__(self, console: Console, cfg: RunConfig, start: int):
        self.enabled = cfg.log.progress and console.is_terminal and jax.process_index() == 0
        self.console, self.total, self.start = console, cfg.train.steps, start

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(
                "train", total=self.total, completed=self.start, loss=""
            )
        return self

    def __call__(self, step: int, loss: float) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, loss=f"loss {loss:.4f}")

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
