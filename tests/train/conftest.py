"""Shared fixtures for trainer tests; the CLI helpers live in tests/cli_testing.py."""

from __future__ import annotations

from ..cli_testing import (  # noqa: F401 - re-exported for the test modules
    ROOT,
    TINY,
    assert_close_states,
    cli,
    cli_env,
    cli_popen,
    cli_wait,
    saved_state,
    snapshot,
    train_losses,
)
