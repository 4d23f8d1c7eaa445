"""Session-wide test settings (bench/gpu_check.sh runs tests/kernels without this file).

One JAX persistent compilation cache per test session, shared by the pytest-xdist workers and
the `menagerie` processes the tests start (they inherit the environment). Many tests train the
same tiny model in a fresh process, and compiling it was half of each run's time; with the
cache, the first run compiles and the others load the executable. The cache starts empty in
every session, so every program is still compiled once per session.
"""

from __future__ import annotations

import os

# XLA:CPU's backend at optimisation level 1 without LLVM's expensive passes, for this session's
# workers and every process they start (set before JAX starts its backend): the tiny programs
# of the tests compile in about two thirds of the CPU time (the tiny Memory Mosaics' cold
# `menagerie train`: 52 s -> 35 s of CPU) and run no slower. Runs compared bit for bit are
# compiled alike, so nothing that is checked depends on it.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=1",
        "--xla_llvm_disable_expensive_passes=true",
    ]
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from .cli_testing import session_root  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip off a GPU (bench/gpu_check.sh runs them on one)."""
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU: bench/gpu_check.sh runs it")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Prepared data go to one folder per test session (CLI subprocesses inherit it)."""
    cache = tmp_path_factory.mktemp("menagerie-cache")
    old = os.environ.get("MENAGERIE_CACHE")
    os.environ["MENAGERIE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("MENAGERIE_CACHE", None)
    else:
        os.environ["MENAGERIE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    cache = session_root(tmp_path_factory) / "jax-compilation-cache"
    cache.mkdir(exist_ok=True)
    cache = str(cache)
    settings = {
        "jax_compilation_cache_dir": cache,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
    }
    old_env = {name: os.environ.get(name.upper()) for name in settings}
    old_config = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)
    yield cache
    for name in settings:
        jax.config.update(name, old_config[name])
        if old_env[name] is None:
            os.environ.pop(name.upper(), None)
        else:
            os.environ[name.upper()] = old_env[name]
