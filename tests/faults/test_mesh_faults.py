"""Meshes that cannot be built, through the real CLI on one CPU device: exit 2, one `error:` line
that says what to set, no traceback, and nothing written (not even the default run folder).
Layouts that can be built: tests/train/test_hybrid_mesh.py; the rules alone: test_mesh.py."""

from __future__ import annotations

import pytest

from ..cli_testing import TINY
from .faults_testing import ONE_PROGRAM, Workspace

QUICK = ["train.steps=2", "train.eval_batches=0", "train.sample_tokens=0", *ONE_PROGRAM]

CASES = {
    # name: (overrides, fragment of the one line)
    "fixed axes do not divide the devices": (
        ["mesh.fsdp=2"],
        "leave 1/2 devices for mesh.data, not a whole number; make the fixed axes divide 1 devices",
    ),
    "sequence axis does not divide seq_len": (
        ["mesh.data=1", "mesh.sequence=3"],  # TINY: seq_len 64
        "does not divide train.seq_len=64 into 2 x 3 zigzag chunks of ring attention; use a "
        "multiple of 6 (e.g. train.seq_len=66)",
    ),
    "DCN shape of more processes than there are": (
        ["mesh.dcn_data=2"],
        "multiply to 2 but this run has 1 process, and its 1 simulated CPU devices do not split"
        " into 2 equal blocks to stand in for processes; set the mesh.dcn_* sizes to 1",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_unbuildable_mesh_gives_one_line_and_writes_nothing(tmp_path, name):
    overrides, fragment = CASES[name]
    Workspace(tmp_path).fails(
        ["train", "-c", str(TINY), *QUICK, *overrides], fragment, cwd=tmp_path
    )
