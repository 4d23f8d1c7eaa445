"""The CPU matmul peak that MFU divides by: measured once per machine, recorded in the cache
folder, read back by later runs; a bad record file costs a measurement, never a run."""

from __future__ import annotations

import json

import jax
from menagerie.train.metrics import PEAK_CACHE, cached_matmul_peak


def test_a_recorded_peak_is_read_back_and_other_machines_are_kept(tmp_path):
    """Catches a record that is written but never read (every run measures again), a key that
    ignores the machine (another host's entry is overwritten), or a record lost on rewrite."""
    device = jax.devices()[0]
    path = tmp_path / "cache" / PEAK_CACHE
    path.parent.mkdir()
    path.write_text(json.dumps({"other host | cpu": 7.0e9}))
    peak, source = cached_matmul_peak(path, device)
    assert peak > 1e8 and source == "measured float32 matmul"
    record = json.loads(path.read_text())
    assert record.pop("other host | cpu") == 7.0e9
    ((key, value),) = record.items()
    assert value == peak
    path.write_text(json.dumps({key: 1.5e12, "other host | cpu": 7.0e9}))
    assert cached_matmul_peak(path, device) == (
        1.5e12,
        f"measured float32 matmul, recorded in {path}",
    )


def test_a_bad_record_is_measured_over_and_an_unwritable_one_left_be(tmp_path):
    """Catches a corrupt, non-numeric or non-positive record that crashes the run or becomes
    its peak, and an unwritable cache folder that stops a run or leaves a temporary file."""
    device = jax.devices()[0]
    path = tmp_path / PEAK_CACHE
    for text in ("{not json", "[1, 2]", None):
        if text is None:  # this machine's key with a zero peak
            key = next(iter(json.loads(path.read_text())))
            text = json.dumps({key: 0.0})
        path.write_text(text)
        peak, source = cached_matmul_peak(path, device)
        assert peak > 1e8 and source == "measured float32 matmul", text
        assert list(json.loads(path.read_text()).values()) == [peak], text
    (tmp_path / "a file").write_text("x")
    blocked = tmp_path / "a file" / PEAK_CACHE  # its folder cannot be made
    peak, source = cached_matmul_peak(blocked, device)
    assert peak > 1e8 and source == "measured float32 matmul"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", PEAK_CACHE]
