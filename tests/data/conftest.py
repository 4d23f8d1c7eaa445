"""Fixtures for tests/data: tiny corpora on disk and a private MENAGERIE_CACHE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """Twenty .txt documents of varying length and content."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "δέλτα", "ε", "zeta", "日本語", "🙂", "\n", "def f():"]
    for i in range(20):
        n = int(rng.integers(5, 200))
        text = " ".join(words[j] for j in rng.integers(0, len(words), n))
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MENAGERIE_CACHE", str(cache))
    return cache
