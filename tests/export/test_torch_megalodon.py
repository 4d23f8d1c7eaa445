"""`--format torch` (`export/pytorch.py`): Megalodon as a folder that needs only PyTorch, with
its plain `torch.nn` mirror (`export/torch_megalodon.py`, copied in as `modeling_megalodon.py`).

The claim: the folder's own module loads the folder strictly and gives our float32 logits
within 1e-4 at lengths below, equal to and several times the chunk size (tied and untied,
SwiGLU or not, scanned or looped layers, 1 or 2 heads, scale_emb, the NFFN layer scale), and
`menagerie export --format torch` writes a folder that works in a process where jax, flax and
menagerie cannot be imported.

Parameters are random (norm scales, the imaginary part of CEMA's gamma, the q/k affines too),
not the initialisation's zeros, so that any misplaced weight or skipped +1 moves the logits.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch  # torch is in the test extra: never skipped
from flax import nnx
from menagerie import arch
from menagerie.arch import MegalodonConfig
from menagerie.export import pytorch as torch_format

from ..cli_testing import MEGALODON_TINY_MODEL
from ..random_params import random_module
from .export_testing import (
    export_verified,
    our_logits,
    run_main,
    saved_run,
    torch_only_logits,
)

TINY = dict(
    d_model=16,
    n_layers=2,
    z_dim=8,
    value_dim=12,
    ffn_hidden_dim=24,
    cema_ndim=3,
    chunk_size=8,
    norm_num_groups=4,
    vocab_size=50,
    vocab_multiple=1,
)
# name -> (config fields, lengths: below, equal to and several times the chunk of 8)
CONFIGS = {
    "untied-silu-scan-h2-seg4": (
        dict(tie_embeddings=False, swiglu=False, scan_layers=True, num_heads=2, cema_segment=4),
        (5, 8, 32),
    ),
    "tied-swiglu-loop-h1-rescale-scaleemb": (
        dict(
            tie_embeddings=True,
            swiglu=True,
            scan_layers=False,
            num_heads=1,
            rescale_nffn=True,
            scale_emb=True,
            rope_base=500.0,
        ),
        (3, 8, 27),  # 27: 3.4 chunks, the last one short
    ),
}


def random_model(cfg, seed: int):
    """Our model of `cfg` (built abstractly) with random parameters."""
    return random_module(lambda: arch.build(cfg, rngs=nnx.Rngs(0)), seed)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_torch_mirror_gives_our_logits(name, tmp_path):
    """The folder that `write` makes, loaded by its own `modeling_megalodon.load` (strict),
    gives our float32 logits within 1e-4 at every length of CONFIGS[name]. Catches, in the
    mirror: a weight under the wrong official name or orientation, TimestepNorm with a sample
    variance or without the cumulative statistics, CEMA with a circular FFT (no zero padding),
    a conjugated product or the phase on the input, v from the CEMA output, RoPE in the
    rotate-half layout, attention crossing a chunk or scaled by 1/sqrt(d), the NFFN adding y
    instead of the block input, the layer scale or scale_emb ignored; in the format:
    config.json missing a field (rope_base 500 is checked directly: the RoPE `freqs` buffer
    carries it too), a parameter not written. (RoPE positions running on across chunks
    instead of restarting give the same scores, RoPE being relative: no test can see that.)"""
    fields, lengths = CONFIGS[name]
    cfg = MegalodonConfig(**{**TINY, **fields})
    model = random_model(cfg, seed=3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    run = SimpleNamespace(cfg=SimpleNamespace(model=cfg), params=params)
    torch_format.write(run, tmp_path, "float32")
    theirs, conf = torch_format.load_module(tmp_path).load(tmp_path)
    assert conf.share_emb == cfg.tie_embeddings and conf.rope_base == cfg.rope_base
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, max(lengths)))
    # Our model is causal (tests/arch/test_megalodon.py checks it), so the logits of a prefix
    # are those of the whole sequence cut: one compilation instead of one per length.
    ours_all = our_logits(model, tokens)
    assert ours_all.std() > 0.1, "degenerate logits"
    for length in lengths:
        with torch.no_grad():
            got = theirs(torch.from_numpy(tokens[:, :length])).numpy()
        err = np.abs(ours_all[:, :length] - got).max()
        print(f"{name} L={length}: max |ours - torch| = {err:.2e}")
        assert err < 1e-4, f"L={length}: max |ours - torch mirror| = {err:.3g}"


# The CLI: a run folder with a checkpoint of random parameters, exported by `menagerie export`.

RUN_MODEL = MEGALODON_TINY_MODEL | {"tie_embeddings": False, "swiglu": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny Megalodon run folder (config.yaml, checkpoint 0 of random parameters) made by
    `Trainer.save_initial`: a trained run's files, without compiling a train step."""
    root = tmp_path_factory.mktemp("torch-export")
    return saved_run(root, RUN_MODEL, 40, lambda cfg: random_model(cfg, seed=5))


# Run in the export folder: jax, flax and menagerie cannot be imported there.


def test_cli_export_verifies_and_runs_with_torch_alone(run_dir, tmp_path):
    """`menagerie export RUN --format torch --verify` writes model.pt, config.json and
    modeling_megalodon.py, and its check (the folder's own loader against `load_run`'s model
    on the run's validation windows, 2.5 chunks of 16) finds the float32 logits within 1e-4;
    then a Python process that cannot import jax, flax or menagerie loads the folder with the
    copied module and gives the same logits as the folder loaded here. Catches: the module
    not copied, a mirror that imports menagerie or JAX (or reads anything outside the folder),
    `reference_logits` missing or loading something other than the folder, the export landing
    in the wrong folder."""
    out = tmp_path / "torch"
    export_verified(run_dir, "torch", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.pt",
        "modeling_megalodon.py",
    ]
    tokens = np.random.default_rng(6).integers(0, 256, (2, 72))  # byte ids, 4.5 chunks
    theirs = torch_only_logits(out, "modeling_megalodon", tokens)
    here = torch_format.reference_logits(out)(tokens)
    np.testing.assert_allclose(theirs, here, atol=1e-6, rtol=0)


def test_bfloat16_export_keeps_cema_and_norms_float32(run_dir, tmp_path):
    """`--dtype bfloat16`: the matrices are stored in bfloat16, the CEMA, norm and q/k affine
    parameters in float32 (as the official code keeps them), and the folder loads (in
    float32) and runs. Catches: every parameter rounded to bfloat16, the dtype ignored."""
    out = tmp_path / "bf16"
    argv = ["export", str(run_dir), "--format", "torch", "--out", str(out), "--dtype", "bfloat16"]
    rc, _, stderr = run_main(argv)
    assert rc == 0, stderr
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["layers.0.mega.wz.weight"].dtype == torch.bfloat16
    assert state["embed.weight"].dtype == torch.bfloat16
    for name in ("cema.alpha", "cema.gamma", "timenorm.weight", "gamma", "rmsnorm.weight"):
        assert state[f"layers.1.mega.{name}"].dtype == torch.float32, name
    logits = torch_format.reference_logits(out)(np.zeros((1, 20), np.int64))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
