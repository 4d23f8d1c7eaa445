"""Chaos: a training run SIGKILLed at 3 random moments (inside a step, during an async
checkpoint save, during an eval) and rerun each time ends bitwise equal to an uninterrupted run,
each rerun having resumed from the newest checkpoint. The driver and the checks are
bench/chaos.py's (`python bench/chaos.py` runs the same with 20 kills). This is the tiny
transformer's kill -9 test; the family tests (Megalodon, Memory Mosaics, LTE) resume their own."""

from __future__ import annotations

import importlib.util
import sys

from ..cli_testing import ROOT


def _load_chaos():
    spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "bench" / "chaos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


def test_sigkill_at_3_random_moments_then_reruns_end_bitwise_equal(tmp_path):
    settings = chaos.Settings(steps=30, checkpoint_every=5, eval_every=10, eval_batches=2)
    result = chaos.run_chaos(tmp_path, kills=3, seed=0, settings=settings, timeout=300)
    table = chaos.table(result)
    assert sorted(k.moment for k in result.kills) == sorted(chaos.KINDS), table
    assert any(k.resumed for k in result.kills), table  # the checks below saw a resume
    assert chaos.check(result) == [], table
