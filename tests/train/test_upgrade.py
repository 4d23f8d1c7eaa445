"""A run folder written before parts were nested (flat `model:` and `optim:` sections in its
config.yaml) resumes and evaluates; an optimizer change that reshapes its state is one line."""

from __future__ import annotations

import shutil

import yaml

from .conftest import TINY, cli

# The model and optim sections as menagerie wrote them before the parts redesign (flat).
OLD_MODEL = {
    "family": "transformer",
    "vocab_size": 384,
    "vocab_multiple": 128,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": None,
    "mlp_dim": None,
    "mlp_multiple": 256,
    "rope_theta": 10000.0,
    "norm_eps": 1.0e-05,
    "tie_embeddings": True,
    "init_std": 0.02,
    "param_dtype": "float32",
    "compute_dtype": "float32",
    "remat": "none",
    "scan_layers": True,
    "mixer": "attention",
    "ffn": "swiglu",
    "head": "lm",
    "attention_impl": "xla",
}
OLD_OPTIM = {
    "name": "galore",
    "lr": 0.003,
    "schedule": "cosine",
    "warmup_steps": 10,
    "min_lr_ratio": 0.1,
    "decay_fraction": 0.2,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1.0e-08,
    "weight_decay": 0.1,
    "clip_norm": 1.0,
    "rank": 8,
    "update_proj_gap": 10,
    "scale": None,
    "proj_side": "std",
    "projection": "svd",
    "moments_on_refresh": "keep",
    "stagger_refresh": False,
    "svd_method": "default",
    "fira": False,
    "lazy_refresh": False,
    "apollo_scaling": "channel",
    "norm_growth_limit": 1.01,
    "proj_seed": 0,
    "lowrank_params": None,
}
RUN = ["train.sample_tokens=0", "train.eval_every=0", "checkpoint.every=2", "log.every=2"]
GALORE = ["optim.name=galore", "optim.rank=8", "optim.update_proj_gap=10"]


def test_pre_redesign_run_folder_resumes_and_evaluates(tmp_path):
    run = tmp_path / "run"
    # Both trainings are one program (same config), so the session's compilation cache compiles
    # it once; the rerun resumes from step 4 because the step-6 checkpoint is moved out.
    first = cli("train", "-c", str(TINY), f"run_dir={run}", "train.steps=6", *RUN, *GALORE)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.move(run / "checkpoints" / "6", tmp_path / "6")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"], saved["optim"] = OLD_MODEL, OLD_OPTIM
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))

    again = cli("train", "-c", str(TINY), f"run_dir={run}", "train.steps=6", *RUN, *GALORE)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(step 4)" in again.stdout, again.stdout
    evaluated = cli("eval", f"run_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.startswith("step 6: eval loss"), evaluated.stdout

    reshaped = cli("train", "-c", str(TINY), f"run_dir={run}", *RUN, *GALORE, "optim.rank=16")
    assert reshaped.returncode == 2
    assert reshaped.stderr.strip().splitlines() == [
        f"error: run_dir '{run}' holds a run of a different model or optimizer state "
        "(optim.rank: 8 -> 16); choose another run_dir, or pass --start-over to move the old "
        "run aside"
    ]
