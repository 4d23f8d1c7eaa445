"""Helpers of the export tests: a run folder of given random parameters, and the CLI in-process."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from menagerie.train.cli import main

from ..jit_testing import LESS_OPTIMISED

# A Python process that cannot import JAX, Flax or menagerie (nor the official packages) loads an
# export folder with its copied mirror module and saves the logits of tokens.pt.
TORCH_ONLY = """
import sys
for name in ("jax", "jaxlib", "flax", "menagerie", "megalodon", "megalodon_jax"):
    sys.modules[name] = None
import torch
from {module} import load
model, config = load(".")
with torch.no_grad():
    torch.save(model(torch.load("tokens.pt")), "logits.pt")
"""


def saved_run(root: Path, model: dict, seq_len: int, make_model: Callable[[Any], Any]) -> Path:
    """A run folder under `root` (config.yaml, checkpoint 0 holding `make_model(model config)`'s
    parameters) made by `Trainer.save_initial` on a 12-document corpus: a trained run's files,
    without compiling a train step."""
    from menagerie.train.config import build_config
    from menagerie.train.trainer import Trainer

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * (2 + i % 3))
    raw = {
        "model": model,
        "data": {"source": str(corpus), "val_fraction": 0.25},
        "train": {"seq_len": seq_len, "batch_size": 2},
    }
    trainer = Trainer(build_config(raw, [f"run_dir={root / 'run'}"]))  # writes config.yaml
    params = make_model(trainer.cfg.model)
    trainer.save_initial(nnx.to_pure_dict(nnx.state(params, nnx.Param)))
    return root / "run"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`menagerie ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def export_verified(run_dir: Path, fmt: str, out: Path) -> str:
    """`menagerie export RUN --format FMT --out OUT --verify` in this process: asserts it
    succeeds, says where it wrote, and finds the export within 1e-4 of the run; returns
    stdout."""
    argv = ["export", str(run_dir), "--format", fmt, "--out", str(out), "--verify"]
    rc, stdout, stderr = run_main(argv)
    assert rc == 0, stderr
    assert f"wrote {fmt} export of {run_dir} to {out}" in stdout
    verified = re.search(r"max \|logit diff\| (\S+),", stdout)
    assert verified and float(verified[1]) < 1e-4, stdout
    print(f"CLI export --verify: max |ours - torch| = {verified[1]}")
    return stdout


def our_logits(model, tokens_BT: np.ndarray) -> np.ndarray:
    """Our float32 logits [B,T,V] of tokens [B,T] at inference (no step in the context)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens).logits)
    tokens = jnp.asarray(tokens_BT, jnp.int32)
    return np.asarray(forward.lower(state, tokens).compile(LESS_OPTIMISED)(state, tokens))


# The fields of the official ModelArgs that config.json must carry (megalodon-jax's config).
OFFICIAL_MEGALODON_KEYS = (
    "vocab_size model_dim num_layers num_heads z_dim value_dim ffn_hidden_dim cema_ndim "
    "chunk_size norm_num_groups norm_eps rope_base swiglu rescale_nffn scale_emb share_emb"
).split()


def official_megalodon_logits(folder: Path) -> Callable[[Any], np.ndarray]:
    """tokens [B,T] -> logits of the official-format export in `folder` (config.json,
    consolidated.pth) loaded by megalodon-jax's strict `load_upstream_state_dict`, jitted.

    `load_upstream_checkpoint` is torch.load + a randomly initialised model + that loader; the
    model is built abstractly (`eqx.filter_eval_shape`) instead, which saves ~10 s of eager
    initialisation: every parameter must then come from the file, or the forward fails on an
    abstract array."""
    import equinox as eqx  # megalodon-jax and torch are in the test extra: never skipped
    import torch
    from megalodon_jax.config import MegalodonConfig
    from megalodon_jax.convert import load_upstream_state_dict
    from megalodon_jax.model import MegalodonForCausalLM

    conf = json.loads((folder / "config.json").read_text())["model"]
    cfg = MegalodonConfig(**{k: conf[k] for k in OFFICIAL_MEGALODON_KEYS})

    def init(key):
        with jax.ensure_compile_time_eval():  # its float(jnp.sqrt(D)) of scale_emb
            return MegalodonForCausalLM(cfg, key=key)

    abstract = eqx.filter_eval_shape(init, jax.random.key(0))
    state = torch.load(folder / "consolidated.pth", map_location="cpu", weights_only=True)
    model = load_upstream_state_dict(abstract, state)
    forward = jax.jit(lambda m, tokens: m(tokens)[0])

    def logits(tokens_BT):
        tokens = jnp.asarray(tokens_BT, jnp.int32)
        return np.asarray(forward.lower(model, tokens).compile(LESS_OPTIMISED)(model, tokens))

    return logits


def torch_only_logits(out: Path, module: str, tokens_BT: np.ndarray) -> np.ndarray:
    """The logits of `tokens_BT` from export folder `out` loaded by its mirror `module` in a
    process that cannot import JAX, Flax or menagerie."""
    import subprocess
    import sys

    import torch

    from ..cli_testing import cli_env

    torch.save(torch.from_numpy(tokens_BT), out / "tokens.pt")
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY.format(module=module)],
        cwd=out,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "logits.pt").numpy()
