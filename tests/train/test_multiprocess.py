"""Two real processes (jax.distributed, gloo collectives on localhost), one CPU device each,
train the same model as one process with two devices: same losses, gradient norms and final
state; and a checkpoint written by either resumes in the other, on another mesh (FSDP over the
two devices or the two processes), where it left off.

Lost peers and a SIGTERM to one process of two: tests/faults/test_peers.py."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import numpy as np

from .conftest import ROOT, TINY, assert_close_states, cli_env, saved_state

# FSDP over two devices vs data parallelism, steps 5 and 6 (measured, CPU, 2026-12-01): losses
# bitwise equal, gradient norms 1.1e-7 apart (their squares summed in another order), final state
# 1.9e-7 (largest |difference| / largest |entry|, worst array). The tolerances are about 5x.
GNORM_RTOL, STATE_RTOL = 5e-7, 1e-6

ARGS = [
    "train",
    "-c",
    str(TINY),
    "train.steps=6",
    "log.every=1",
    "train.eval_every=0",
    "train.eval_batches=2",
    "train.sample_tokens=0",
    "checkpoint.every=2",
    "checkpoint.keep_last=3",
    "mesh.data=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, devices: int, env_extra: dict, *overrides: str) -> subprocess.Popen:
    env = cli_env()
    devices_flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices_flag}"  # after the session's
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "menagerie.train.cli", *ARGS, f"run_dir={run_dir}", *overrides],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _two_processes(run_dir, *overrides: str, alongside=()) -> list[tuple[int, str]]:
    """Runs the two processes (and any `alongside` already started) to the end."""
    port = _free_port()
    procs = [
        _launch(
            run_dir,
            1,
            {
                "MENAGERIE_COORDINATOR": f"127.0.0.1:{port}",
                "MENAGERIE_NUM_PROCESSES": "2",
                "MENAGERIE_PROCESS_ID": str(i),
            },
            *overrides,
        )
        for i in range(2)
    ]
    procs = [*procs, *alongside]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, text))
    return out


def _train_rows(run_dir) -> list[dict]:
    """Every train row of metrics.jsonl, in the order written (a resumed run appends)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def test_two_processes_match_one_process_and_resume(tmp_path):
    one = _launch(tmp_path / "one", 2, {})  # runs alongside the two processes
    *results, (rc, text) = _two_processes(tmp_path / "multi", alongside=[one])
    assert rc == 0, text[-3000:]
    for rc, text in results:
        assert rc == 0, text[-3000:]
    # Process 0 alone logs and evaluates to the console; both ran all steps.
    assert "final eval" in results[0][1]
    a, b = _train_rows(tmp_path / "one"), _train_rows(tmp_path / "multi")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    # Measured bitwise equal (a 2-way all-reduce is one addition, whichever process adds).
    for name in ("loss", "grad_norm"):
        np.testing.assert_array_equal([r[name] for r in b], [r[name] for r in a], err_msg=name)
    assert_close_states(
        saved_state(tmp_path / "multi/checkpoints/6"),
        saved_state(tmp_path / "one/checkpoints/6"),
        rtol=0.0,
    )
    _resume_across_process_counts(tmp_path, a)


def _resume_across_process_counts(tmp_path, uninterrupted: list[dict]) -> None:
    """Both runs stop after their step-4 checkpoint (the step-6 ones moved out); the 2-process
    run resumes in 1 process and the 1-process run in 2 processes, both on FSDP over two
    devices (Orbax reshards on restore): each resumes from step 4, not from step 2 or from
    scratch, runs steps 5 and 6 only, and ends where the uninterrupted runs ended. Caught when
    broken (seen): a restore in the layout the checkpoint was saved with, not the new one
    (Orbax: "Topology mismatch", no readable checkpoint)."""
    for run in ("multi", "one"):
        shutil.move(tmp_path / run / "checkpoints/6", tmp_path / f"{run}-6")
    fsdp = ("mesh.data=1", "mesh.fsdp=2", "train.eval_batches=0")
    in_one = _launch(tmp_path / "multi", 2, {}, *fsdp)
    *in_two, done = _two_processes(tmp_path / "one", *fsdp, alongside=[in_one])
    for (rc, text), run in [(in_two[0], "one"), (in_two[1], "one"), (done, "multi")]:
        assert rc == 0, text[-3000:]
        assert f"resumed from {tmp_path / run / 'checkpoints/4'} (step 4)" in text
        assert "'data': 1, 'fsdp': 2" in text
    for run in ("multi", "one"):
        rows = _train_rows(tmp_path / run)
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 5, 6]
        got, want = rows[6:], uninterrupted[4:]
        np.testing.assert_array_equal([r["loss"] for r in got], [r["loss"] for r in want])
        np.testing.assert_allclose(
            [r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=GNORM_RTOL
        )
        final = saved_state(tmp_path / run / "checkpoints/6")
        assert int(final["step"]) == 6
        assert_close_states(final, saved_state(tmp_path / f"{run}-6"), rtol=STATE_RTOL)
    # The two directions end bit for bit alike: the same mesh, whoever wrote the checkpoint.
    assert_close_states(
        saved_state(tmp_path / "multi/checkpoints/6"),
        saved_state(tmp_path / "one/checkpoints/6"),
        rtol=0.0,
    )


def test_incomplete_or_wrong_environment_is_one_config_error():
    import pytest
    from menagerie.train import distributed
    from menagerie.train.errors import ConfigError

    assert distributed.initialize({}) is False  # single process: nothing to do
    assert distributed.initialize({"MENAGERIE_DISTRIBUTED": "off"}) is False
    bad = [
        ({"MENAGERIE_PROCESS_ID": "0"}, "MENAGERIE_COORDINATOR, MENAGERIE_NUM_PROCESSES missing"),
        (
            {
                "MENAGERIE_COORDINATOR": "h:1",
                "MENAGERIE_NUM_PROCESSES": "2",
                "MENAGERIE_PROCESS_ID": "2",
            },
            r"must be in \[0, MENAGERIE_NUM_PROCESSES=2\)",
        ),
        (
            {
                "MENAGERIE_COORDINATOR": "h:1",
                "MENAGERIE_NUM_PROCESSES": "two",
                "MENAGERIE_PROCESS_ID": "0",
            },
            "not an integer",
        ),
        ({"MENAGERIE_DISTRIBUTED": "maybe"}, "use 'auto' or 'off'"),
        (
            {"MENAGERIE_DISTRIBUTED": "auto", "MENAGERIE_PEER_TIMEOUT": "2m"},
            "MENAGERIE_PEER_TIMEOUT='2m' must be a whole number of seconds > 0",
        ),
        (
            {"MENAGERIE_DISTRIBUTED": "auto", "MENAGERIE_STEP_TIMEOUT": "0"},
            "MENAGERIE_STEP_TIMEOUT='0' must be a whole number of seconds > 0",
        ),
    ]
    for env, message in bad:
        with pytest.raises(ConfigError, match=message):
            distributed.initialize(env)
