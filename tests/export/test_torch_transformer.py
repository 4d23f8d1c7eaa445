"""`--format torch` for the transformer family (`export/pytorch.py`, `export/transformer.py`):
the plain `torch.nn` mirror `export/torch_transformer.py`, copied in as
`modeling_transformer.py`, with the parts Llama lacks (the GELU MLP, LTE over SwiGLU or the MLP
with every routing).

The claims: the folder's own module loads the folder strictly and gives our float32 logits at
inference (`ctx.step` None, where a model with `hard_from_step` routes hard through the sparse
kernel) within 1e-4, for tiny configs covering threshold routing soft and hard, topk, dejavu and
all_experts, inner SwiGLU and MLP, tied and untied heads, scanned and looped layers, GQA and
MHA, a head_dim and rope_theta of their own; `menagerie export --format torch --verify` passes on
such runs and writes a folder that runs where jax, flax and menagerie cannot be imported; a
part the mirror lacks is refused in one line with nothing written; bfloat16 keeps the routers
and norms float32.

Parameters are random (`tests/random_params.py`: norm scales, router biases too), so any
misplaced weight moves the logits; for hard routing the test checks that the random routers
turn a real mix of experts on and off, token by token, without which a wrong gate could pass.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch  # torch is in the test extra: never skipped
import yaml
from flax import nnx
from menagerie import arch
from menagerie.arch.transformer import TransformerConfig
from menagerie.export import pytorch as torch_format
from menagerie.train.errors import ConfigError

from ..random_params import random_module
from .export_testing import (
    export_verified,
    our_logits,
    run_main,
    saved_run,
    torch_only_logits,
)

TINY = dict(d_model=16, n_layers=2, vocab_size=50, vocab_multiple=1)
GQA = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}
MHA_OWN_DIMS = {"kind": "attention", "n_heads": 2, "head_dim": 6, "rope_theta": 500.0}
SWIGLU = {"kind": "swiglu", "hidden_dim": 24}  # 6 experts of 4
MLP = {"kind": "mlp", "hidden_dim": 32}  # 8 experts of 4


def lte(inner: dict, **fields) -> dict:
    return {"kind": "lte", "inner": inner, "expert_size": 4, **fields}


# name -> model fields over TINY; each has an FFN or a head beyond Llama (--format hf refuses it)
CONFIGS = {
    "threshold-soft-swiglu-untied-scan": dict(
        mixer=GQA, ffn=lte(SWIGLU), tie_embeddings=False, scan_layers=True
    ),
    "threshold-hard-mlp-tied-loop": dict(
        mixer=MHA_OWN_DIMS,
        ffn=lte(MLP, hard_from_step=10, tau=0.6),
        tie_embeddings=True,
        scan_layers=False,
    ),
    "threshold-hard-swiglu-untied-loop": dict(
        mixer=GQA, ffn=lte(SWIGLU, hard_from_step=1), tie_embeddings=False, scan_layers=False
    ),
    "topk-swiglu-tied-scan": dict(
        mixer=GQA, ffn=lte(SWIGLU, routing="topk", top_k=3), tie_embeddings=True, scan_layers=True
    ),
    "dejavu-mlp-untied-scan": dict(
        mixer=MHA_OWN_DIMS,
        ffn=lte(MLP, routing="dejavu", top_k=3, predictor_rank=3, hard_from_step=5),
        tie_embeddings=False,
        scan_layers=True,
    ),
    "all-experts-mlp-tied-loop": dict(
        mixer=GQA, ffn=lte(MLP, hard_from_step=1, all_experts=True), scan_layers=False
    ),
    "mlp-untied-scan": dict(mixer=GQA, ffn=MLP, tie_embeddings=False, scan_layers=True),
    # A local window of 5 keys with 2 sinks (StreamingLLM) over 24 tokens.
    "window-sinks-swiglu-tied-loop": dict(
        mixer=GQA | {"window": 5, "sinks": 2}, ffn=SWIGLU, scan_layers=False
    ),
    # Lookahead heads (arch/planner.py): planners whose plan conditions the LM (gated, blocks of
    # 5 over 24 tokens: the last block partial; ungated, blocks of 4), and two whose inference
    # is the LM head alone.
    "planner-swiglu-untied-scan": dict(
        mixer=GQA,
        ffn=SWIGLU,
        head={"kind": "planner", "block": 5, "n_heads": 2, "hidden_dim": 20, "latent_weight": 0.1},
        tie_embeddings=False,
    ),
    "planner-ungated-swiglu-tied-loop": dict(
        mixer=GQA,
        ffn=SWIGLU,
        head={
            "kind": "planner",
            "condition_gate": False,
            "block": 4,
            "n_heads": 2,
            "hidden_dim": 20,
        },
        scan_layers=False,
    ),
    "planner-aux-only-swiglu-tied-loop": dict(
        mixer=GQA,
        ffn=SWIGLU,
        head={"kind": "planner", "condition_lm": False, "block": 4, "n_heads": 2, "hidden_dim": 20},
        scan_layers=False,
    ),
    "mtp-parallel-mlp-tied-loop": dict(
        mixer=GQA, ffn=MLP, head={"kind": "mtp_parallel", "n_future": 2}, scan_layers=False
    ),
    "mtp-sequential-swiglu-untied": dict(
        mixer=MHA_OWN_DIMS, ffn=SWIGLU, head={"kind": "mtp_sequential"}, tie_embeddings=False
    ),
}
HARD = ("threshold-hard", "topk", "dejavu")  # configs whose gates are 0 for some experts


def random_model(cfg, seed: int):
    """Our model of `cfg` (built abstractly) with random parameters, the norm scales times 4
    (spread 1.2): then the FFN's pre-activations are O(1), where the exact and the tanh GELU
    differ, and the logits O(1)."""
    model = random_module(lambda: arch.build(cfg, rngs=nnx.Rngs(0)), seed)
    for path, scale in nnx.iter_graph(model):
        if path and path[-1] == "scale":
            scale[...] = 4 * scale[...]
    return model


def mirror_gates(model, tokens_BT: np.ndarray) -> list[np.ndarray]:
    """Each layer's LTE gates [B*T, E] in the mirror `model` for `tokens_BT`."""
    gates = []
    hooks = [
        layer.ffn.register_forward_hook(lambda m, args, out: gates.append(m.gates(args[0])))
        for layer in model.layers
    ]
    with torch.no_grad():
        model(torch.from_numpy(tokens_BT))
    for hook in hooks:
        hook.remove()
    return [g.reshape(-1, g.shape[-1]).numpy() for g in gates]


def assert_real_mix(gates: list[np.ndarray]) -> None:
    """In every layer at least 10% of the (token, expert) gates are 0 and 10% are not, and the
    tokens do not all take the same experts."""
    for i, g in enumerate(gates):
        on = g != 0
        assert 0.1 <= on.mean() <= 0.9, f"layer {i}: {on.mean():.0%} of the gates are on"
        assert len(np.unique(on, axis=0)) > 1, f"layer {i}: every token takes the same experts"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_torch_mirror_gives_our_logits(name, tmp_path):
    """The folder that `write` makes, loaded by its own `modeling_transformer.load` (strict), gives
    our float32 logits within 1e-4 on 2 x 24 random tokens. Catches, in the mirror: RoPE in the
    interleaved layout, GQA heads grouped h % K instead of h // G, attention scaled by 1/sqrt(D)
    or not causal, the window one key too wide or the sinks dropped, RMSNorm as 1 + weight, tanh
    GELU; LTE's gate soft where ours is hard (or hard where soft), the top-k weights 1 instead
    of G (topk) or G instead of 1 (dejavu), expert e's gate on neurons e, e + E, ... instead of
    its contiguous block, dejavu without W2, the router bias dropped, all_experts ignored; the
    planner's plan added to its own block instead of the next, its plan norm skipped; in the
    format: a kernel under the wrong name or orientation (q/o head flattening), config.json's
    hard flag, top_k or tau not written. For hard routing it first checks that the random
    routers leave a real mix of experts on and off, so that those gate bugs would move the
    logits."""
    cfg = TransformerConfig(**TINY, **CONFIGS[name])
    model = random_model(cfg, seed=3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    run = SimpleNamespace(cfg=SimpleNamespace(model=cfg), params=params)
    torch_format.write(run, tmp_path, "float32")
    theirs, conf = torch_format.load_module(tmp_path).load(tmp_path)
    assert conf.tie_embeddings == cfg.tie_embeddings and conf.ffn == cfg.ffn.kind
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 24))
    if name.startswith(HARD):
        assert_real_mix(mirror_gates(theirs, tokens))
    ours = our_logits(model, tokens)
    assert ours.std() > 0.1, "degenerate logits"
    with torch.no_grad():
        got = theirs(torch.from_numpy(tokens)).numpy()
    err = np.abs(ours - got).max()
    print(f"{name}: max |ours - torch| = {err:.2e}")
    assert err < 1e-4, f"max |ours - torch mirror| = {err:.3g}"


# The CLI: run folders with a checkpoint of random parameters, exported by `menagerie export`.

CLI_CONFIGS = ("threshold-hard-mlp-tied-loop", "dejavu-mlp-untied-scan", "topk-swiglu-tied-scan")


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    """Tiny transformer run folders (config.yaml, checkpoint 0 of random parameters) made by
    `Trainer.save_initial` for each of CLI_CONFIGS, on the byte tokenizer."""
    out = {}
    for name in CLI_CONFIGS:
        root = tmp_path_factory.mktemp(name)
        model = {"family": "transformer", "d_model": 16, "n_layers": 2, **CONFIGS[name]}
        out[name] = saved_run(root, model, 24, lambda cfg: random_model(cfg, seed=5))
    return out


# Run in the export folder: jax, flax and menagerie cannot be imported there.


@pytest.mark.parametrize("name", CLI_CONFIGS)
def test_cli_export_verifies_and_runs_with_torch_alone(name, run_dirs, tmp_path):
    """`menagerie export RUN --format torch --verify` on an LTE run writes model.pt,
    config.json and modeling_transformer.py, and its check (the folder's own loader against
    `load_run`'s model on the run's validation windows) finds the float32 logits within 1e-4;
    then a Python process that cannot import jax, flax or menagerie loads the folder with the
    copied module and gives the logits the folder gives here. Catches: `--format torch` still
    refusing the transformer family, the Megalodon mirror copied or chosen by
    `reference_logits` for a transformer folder, a mirror that imports menagerie or JAX, the
    hard flag read from the run's training state instead of inference (`load_run`'s model is
    run without a step, so it routes hard)."""
    out = tmp_path / "torch"
    export_verified(run_dirs[name], "torch", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.pt",
        "modeling_transformer.py",
    ]
    tokens = np.random.default_rng(6).integers(0, 256, (2, 40))  # byte ids
    theirs = torch_only_logits(out, "modeling_transformer", tokens)
    here = torch_format.reference_logits(out)(tokens)
    np.testing.assert_allclose(theirs, here, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "model, says",
    [
        ({"mixer": {"kind": "context_memory"}}, "model.mixer.kind is 'context_memory'"),
        ({"ffn": {"kind": "persistent_memory"}}, "model.ffn.kind is 'persistent_memory'"),
        ({"family": "mosaics"}, "--format torch writes megalodon, transformer models"),
    ],
)
def test_a_part_the_mirror_lacks_is_refused_in_one_line(model, says, tmp_path):
    """A transformer run with a part the mirror does not have (context_memory, the persistent
    memory FFN), or a family without a mirror, gets exit code 2 and one line naming it, and
    `--out` is not created. Catches: `check` missing from the dispatch (the export would be
    written, or fail with a KeyError traceback), a check that runs after the folder is made."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"family": "transformer", **model}}))
    rc, _, stderr = run_main(
        ["export", str(run), "--format", "torch", "--out", str(tmp_path / "o")]
    )
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1, stderr
    assert says in lines[0], stderr
    assert not (tmp_path / "o").exists()


def test_bfloat16_export_keeps_routers_and_norms_float32(tmp_path):
    """`--dtype bfloat16`: the matrices and the embedding are stored in bfloat16, the LTE
    router (W1, W2 and bias) and the norm scales in float32, and the folder loads (in float32)
    and runs. Catches: the router rounded to bfloat16 (flipping threshold and top-k decisions
    near the edge), the dtype ignored."""
    cfg = TransformerConfig(**TINY, **CONFIGS["dejavu-mlp-untied-scan"])
    params = nnx.to_pure_dict(nnx.state(random_model(cfg, seed=3), nnx.Param))
    run = SimpleNamespace(cfg=SimpleNamespace(model=cfg), params=params)
    torch_format.write(run, tmp_path, "bfloat16")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    for name in (
        "embed.weight",
        "head.weight",
        "layers.1.mixer.o.weight",
        "layers.0.ffn.inner.up.weight",
    ):
        assert state[name].dtype == torch.bfloat16, name
    for name in (
        "ffn.router.weight",
        "ffn.router_out.weight",
        "ffn.router_bias",
        "ffn_norm.weight",
    ):
        assert state[f"layers.1.{name}"].dtype == torch.float32, name
    assert state["final_norm.weight"].dtype == torch.float32
    logits = torch_format.reference_logits(tmp_path)(np.zeros((1, 20), np.int64))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_a_parameter_the_map_does_not_place_is_refused(tmp_path):
    """Parameters with one more array than the mirror's state dict places (a part that grew a
    parameter) give a one-line ConfigError naming it, and nothing is written. Catches: an
    export that drops a parameter silently (strict loading cannot see a tensor never written
    whose module the mirror lacks too)."""
    cfg = TransformerConfig(**TINY, **CONFIGS["threshold-hard-swiglu-untied-loop"])
    params = nnx.to_pure_dict(nnx.state(random_model(cfg, seed=3), nnx.Param))
    params["blocks"][1]["ffn"]["router_scale"] = np.ones(6, np.float32)
    run = SimpleNamespace(cfg=SimpleNamespace(model=cfg), params=params)
    with pytest.raises(ConfigError, match=r"1 parameter\(s\) .*first: blocks\.ffn\.router_scale"):
        torch_format.write(run, tmp_path, "float32")
    assert list(tmp_path.iterdir()) == []
