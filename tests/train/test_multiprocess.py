"""Two real processes (jax.distributed, gloo collectives on localhost), one CPU device each,
train the same model as one process with two devices: same losses, gradient norms and final
state; one checkpoint, from which both processes resume where it left off."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import numpy as np

from .conftest import ROOT, TINY, assert_close_states, cli_env, saved_state

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

    # The run stops after its step-4 checkpoint (the step-6 one moved out of the run); both
    # processes rerun resume from step 4, not from step 2 or from scratch, run steps 5 and 6
    # only, and end bit for bit where the uninterrupted run ended.
    shutil.move(tmp_path / "multi/checkpoints/6", tmp_path / "multi-6")
    more = _two_processes(tmp_path / "multi")
    for rc, text in more:
        assert rc == 0, text[-3000:]
        assert f"resumed from {tmp_path / 'multi/checkpoints/4'} (step 4)" in text
    assert [r["step"] for r in _train_rows(tmp_path / "multi")] == [1, 2, 3, 4, 5, 6, 5, 6]
    final = saved_state(tmp_path / "multi/checkpoints/6")
    assert int(final["step"]) == 6
    assert_close_states(final, saved_state(tmp_path / "multi-6"), rtol=0.0)


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
    ]
    for env, message in bad:
        with pytest.raises(ConfigError, match=message):
            distributed.initialize(env)
