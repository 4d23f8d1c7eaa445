"""Hybrid (DCN x ICI) meshes on real device lists: 8 simulated CPU devices in one process, whose
contiguous blocks stand in for nodes, and two real processes (jax.distributed on localhost) of
two devices each, built by `mesh_utils.create_hybrid_device_mesh` with processes as granules.

Each case is its own process started through this module (`python -m tests.train.test_hybrid_mesh
CASE`), with XLA_FLAGS set before JAX starts; it prints one JSON line: per mesh config, the grid
of device ids and of process indices, or the ConfigError's line.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np

from .conftest import ROOT, cli_env

LAYOUTS = {
    # name: MeshConfig fields
    "dcn_data2": {"data": 1, "fsdp": 2, "tensor": 2, "dcn_data": 2},
    "dcn_data2_data2": {"data": 2, "fsdp": -1, "dcn_data": 2},
    "dcn_data2_dcn_fsdp2": {"data": 1, "fsdp": 2, "dcn_data": 2, "dcn_fsdp": 2},
    "dcn_data3": {"dcn_data": 3},
}


def _start(devices: int, case: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = cli_env()
    devices_flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {devices_flag}"  # after the session's
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "tests.train.test_hybrid_mesh", case],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_simulated_nodes_are_contiguous_blocks_and_only_dcn_axes_cross_them():
    """8 devices, dcn_data=2: devices 0-3 are one pseudo-node, 4-7 the other; every fsdp x
    tensor group lies inside one node, and the data axis crosses them. Catches a layout that
    interleaves granules (a group spanning nodes) or ignores the DCN shape."""
    got = _result(_start(8, "layouts"))
    ids = np.array(got["dcn_data2"]["ids"])  # [data, fsdp, tensor, sequence]
    assert ids.shape == (2, 2, 2, 1)
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    # dcn 2 x inner 2 on data: granule = data index // 2, fsdp (filled: 2) inside.
    ids = np.array(got["dcn_data2_data2"]["ids"])
    assert ids.shape == (4, 2, 1, 1)
    np.testing.assert_array_equal(ids[..., 0, 0] // 4, [[0, 0], [0, 0], [1, 1], [1, 1]])
    # dcn on data and fsdp: 4 nodes of 2; node = 2 * data index + fsdp index // 2.
    ids = np.array(got["dcn_data2_dcn_fsdp2"]["ids"])
    assert ids.shape == (2, 4, 1, 1)
    np.testing.assert_array_equal(ids[..., 0, 0] // 2, [[0, 0, 1, 1], [2, 2, 3, 3]])
    assert "do not split into 3 equal blocks" in got["dcn_data3"]["error"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_are_two_granules():
    """Two real processes of 2 devices, dcn_data=2 x fsdp=2: each process's devices are one data
    row (its FSDP group); dcn_data=4 names the 2 processes there are. Catches granules taken by
    device order instead of process, and a DCN check that counts devices, not processes."""
    port = _free_port()
    procs = [
        _start(
            2,
            "processes",
            {
                "MENAGERIE_COORDINATOR": f"127.0.0.1:{port}",
                "MENAGERIE_NUM_PROCESSES": "2",
                "MENAGERIE_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    try:
        results = [_result(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for got in results:
        assert got["unit"] == "process"
        procs_grid = np.array(got["dcn_data2"]["processes"])
        np.testing.assert_array_equal(procs_grid[:, :, 0, 0], [[0, 0], [1, 1]])
        assert "multiply to 4 but this run has 2 processes" in got["dcn_data4"]["error"]


# ---- the subprocess side ---------------------------------------------------------------------


def _layout(fields: dict) -> dict:
    from menagerie.train.config import MeshConfig
    from menagerie.train.errors import ConfigError
    from menagerie.train.mesh import make_mesh

    try:
        grid = make_mesh(MeshConfig(**fields)).devices
    except ConfigError as e:
        return {"error": str(e)}
    return {
        "ids": np.vectorize(lambda d: d.id)(grid).tolist(),
        "processes": np.vectorize(lambda d: d.process_index)(grid).tolist(),
    }


def _main(case: str) -> None:
    if case == "layouts":
        print(json.dumps({name: _layout(fields) for name, fields in LAYOUTS.items()}))
        return
    from menagerie.train import distributed

    assert distributed.initialize()
    import jax
    from menagerie.train.mesh import device_granules

    unit, _ = device_granules(jax.devices(), {"data": 2})
    out = {
        "unit": unit,
        "dcn_data2": _layout({"data": 1, "fsdp": 2, "dcn_data": 2}),
        "dcn_data4": _layout({"dcn_data": 4}),
    }
    print(json.dumps(out), flush=True)
    distributed.barrier("hybrid-mesh-test-done")


if __name__ == "__main__":
    _main(sys.argv[1])
