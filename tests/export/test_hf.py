"""`--format hf`, `--verify` and `import-hf` against `transformers` itself.

The claim: a transformer-family run exported with `to_hf` loads in
`AutoModelForCausalLM.from_pretrained` as `LlamaForCausalLM` and gives our float32 logits within
1e-4 (tied and untied heads, GQA and multi-head, scanned and looped layers, padded vocabulary),
its tokenizer loads in `AutoTokenizer` and encodes and decodes as ours; importing the folder
back gives a run folder whose restored model has the original logits, which `menagerie train`
continues, `menagerie eval` evaluates and `export --verify` checks; bad input is one line,
exit 2, nothing written.

Models have random parameters (norm scales too), not init values, so that any transposed,
misplaced or swapped weight changes the logits.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # torch and transformers are in the test extra: never skipped
import transformers
import yaml
from flax import nnx
from menagerie import arch
from menagerie.data.tokenizers import BPETokenizer, ByteTokenizer
from menagerie.export import LoadedRun, import_hf, load_run, to_hf
from menagerie.export import hf as hf_format
from menagerie.train.cli import main
from menagerie.train.config import build_config

from ..cli_testing import MEGALODON_TINY_MODEL, snapshot
from ..jit_testing import quick_jit

TEXTS = [
    "def área(r):\n    return 3.14159 * r ** 2  # π r²\n",
    "class Émoji:\n    parrot = '🦜'\t# tabs, <|eos|> and  spaces\n",
]
MODELS = {
    # untied head, GQA (4 query heads on 2 kv heads), scanned layers, byte tokenizer
    "untied-gqa-byte": {
        "tie_embeddings": False,
        "mixer": {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0},
        "scan_layers": True,
    },
    # tied head, multi-head attention with head_dim != d_model / n_heads, looped layers, BPE
    "tied-mha-bpe": {
        "tie_embeddings": True,
        "mixer": {"n_heads": 2, "head_dim": 12, "rope_theta": 10000.0},
        "scan_layers": False,
        "norm_eps": 1e-3,
    },
}
RUN_DATA = ["data.val_fraction=0.25", "train.seq_len=32", "train.batch_size=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 small Python-like documents, one .txt file each."""
    root = tmp_path_factory.mktemp("hf-corpus")
    for i in range(40):
        body = f"def f{i}(x):\n    return x * {i} + {i % 7}  # {TEXTS[i % 2]}\n" * (1 + i % 3)
        (root / f"doc{i:02d}.txt").write_text(body)
    return root


@pytest.fixture(scope="module")
def runs(corpus):
    """name -> LoadedRun of a tiny random transformer (see MODELS) with its tokenizer."""
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    tokenizers = {"byte": ByteTokenizer(), "bpe": BPETokenizer.train(texts, 300)}
    out = {}
    for i, (name, fields) in enumerate(MODELS.items()):
        tok = tokenizers[name.split("-")[-1]]
        model = {"d_model": 32, "n_layers": 2, "ffn": {"hidden_dim": 48}} | fields
        cfg = build_config({"model": model, "train": {"seq_len": 32}})
        cfg = cfg.model_copy(update={"model": cfg.model.with_vocab(tok.vocab_size)})
        out[name] = LoadedRun(_random_model(cfg.model, seed=i), tok, cfg, 0, None)
    return out


def _random_model(model_cfg, seed: int):
    """The model of `model_cfg` with N(0, 0.3^2) matrices and 1 + N(0, 0.3^2) norm scales."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def draw(path, x):
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.3 * rng.standard_normal(x.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """name -> the `to_hf` folder of that run (float32)."""
    root = tmp_path_factory.mktemp("hf-exports")
    return {name: to_hf(run, root / name) for name, run in runs.items()}


def _tokens(tokenizer) -> np.ndarray:
    ids = [tokenizer.encode(t) for t in TEXTS]
    n = min(len(i) for i in ids)
    return np.stack([i[:n] for i in ids]).astype(np.int32)


def _ours(run, tokens_BT) -> np.ndarray:
    return np.asarray(quick_jit(lambda m, t: m(t).logits)(run.model, jnp.asarray(tokens_BT)))


def _theirs(folder, tokens_BT) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens_BT.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("name", MODELS)
def test_transformers_gives_our_logits(runs, exports, name):
    """Catches: a weight transposed or flattened in the wrong head order (q/k/v/o, gate/up/
    down), the input and post-attention norms swapped, q/k permuted for an interleaved RoPE
    (ours is rotate-half, like HF), GQA kv heads mis-grouped, rope_theta, rms_norm_eps or
    head_dim not written, a tied head exported untied (HF would draw a random lm_head) or an
    untied one written as tied, the padding rows of the vocabulary dropped."""
    run, folder = runs[name], exports[name]
    tokens = _tokens(run.tokenizer)
    ours, theirs = _ours(run, tokens), _theirs(folder, tokens)
    assert theirs.shape == ours.shape  # [B, T, padded_vocab]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == run.cfg.model.padded_vocab > run.tokenizer.vocab_size
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["suppress_tokens"][0] == run.tokenizer.vocab_size


LM_HEAD_ONLY = {  # lookahead heads whose inference output is their LM head's
    "mtp_sequential": {"kind": "mtp_sequential"},
    "aux_only_planner": {"kind": "planner", "condition_lm": False, "block": 4},
}


@pytest.mark.parametrize("head", LM_HEAD_ONLY)
def test_a_lookahead_head_exports_as_its_lm_head(head, tmp_path):
    """An untied MTP head, or a planner that does not condition the LM, exports as a Llama
    whose lm_head is the head's LM head, with the training-only modules left out. Catches: the
    untied LM head read from the plain head's path (a KeyError) or from a module only training
    reads, a planner that conditions the LM let through (its test in EXPORT_CASES)."""
    tok = ByteTokenizer()
    model = {"d_model": 32, "n_layers": 1, "ffn": {"hidden_dim": 48}, "tie_embeddings": False}
    cfg = build_config({"model": model | {"head": LM_HEAD_ONLY[head]}, "train": {"seq_len": 32}})
    cfg = cfg.model_copy(update={"model": cfg.model.with_vocab(tok.vocab_size)})
    run = LoadedRun(_random_model(cfg.model, seed=5), tok, cfg, 0, None)
    folder = to_hf(run, tmp_path / "hf")
    tokens = _tokens(tok)
    np.testing.assert_allclose(_theirs(folder, tokens), _ours(run, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_tokenizer_encodes_and_decodes_as_ours(runs, exports, name):
    """Catches: byte ids off by one or in another byte order, the literal text "<|eos|>" read
    as the EOS token by HF but as bytes by our byte tokenizer (split_special_tokens), the EOS
    token not declared, a BPE saved without its merges, a decode that drops or adds spaces."""
    ours = runs[name].tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(exports[name])
    assert theirs.eos_token_id == ours.eos_id
    for text in [*TEXTS, " leading space, trailing \n\n", "\x00\x7f\u00ff\U0001f600"]:
        ids = ours.encode(text).tolist()
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


def test_import_back_gives_the_original_logits(runs, exports, corpus, tmp_path):
    """Catches: an imported weight left untransposed (shapes agree when square) or taken from
    the wrong layer, the imported parameters replaced by the init, the tied head or the BPE
    tokenizer lost on the way back (a BPE turned into bytes), a checkpoint at another step.
    (The untied GQA byte model comes back through the CLI, in the test below.)"""
    name = "tied-mha-bpe"
    run_dir = import_hf(exports[name], tmp_path / "run", [f"data.source={corpus}", *RUN_DATA])
    _assert_same_model(load_run(run_dir), runs[name])


def _assert_same_model(back, original):
    assert back.step == 0
    assert back.cfg.model.tie_embeddings == original.cfg.model.tie_embeddings
    assert type(back.tokenizer) is type(original.tokenizer)
    assert back.tokenizer.vocab_size == original.tokenizer.vocab_size
    tokens = _tokens(original.tokenizer)
    assert back.tokenizer.encode(TEXTS[0]).tolist() == original.tokenizer.encode(TEXTS[0]).tolist()
    np.testing.assert_allclose(_ours(back, tokens), _ours(original, tokens), atol=1e-6, rtol=0)


def test_import_renames_another_end_of_text_token(corpus, tmp_path):
    """Catches: a BPE whose end-of-text token is not `<|eos|>` refused or given a new id (our
    documents would end with a token the model never saw)."""
    from menagerie.export.hf_tokenizer import read_tokenizer
    from tokenizers import Tokenizer

    bpe = BPETokenizer.train([p.read_text() for p in sorted(corpus.iterdir())], 300)
    spec = json.loads(bpe._tok.to_str().replace("<|eos|>", "<|endoftext|>"))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    eos = Tokenizer.from_str(json.dumps(spec)).token_to_id("<|endoftext|>")
    tok = read_tokenizer(tmp_path, {"vocab_size": 384, "eos_token_id": eos})
    ours = BPETokenizer(Tokenizer.from_str(tok.json))
    assert ours.eos_id == eos and ours.vocab_size == bpe.vocab_size
    assert ours.encode(TEXTS[1]).tolist() == bpe.encode(TEXTS[1]).tolist()


@pytest.fixture(scope="module")
def imported_and_trained(runs, exports, corpus, tmp_path_factory):
    """The CLI flow, in process: import-hf the untied GQA export, eval it, train it 2 steps.
    Returns (run folder, the run restored right after the import, [output of each command])."""
    run = tmp_path_factory.mktemp("hf-cli") / "run"
    steps = ["train.steps=2", "train.eval_every=0", "train.sample_tokens=0"]
    args = [f"data.source={corpus}", *RUN_DATA, *steps, "train.eval_batches=1"]
    outputs, imported = [], None
    for argv in (
        ["import-hf", str(exports["untied-gqa-byte"]), *args, "--out", str(run)],
        ["eval", f"run_dir={run}"],
        ["train", "-c", str(run / "config.yaml")],
    ):
        proc = _main(argv)
        assert proc["rc"] == 0, proc
        outputs.append(proc["out"])
        imported = imported or load_run(run)
    return run, imported, outputs


def _main(argv):
    """`menagerie ARGV` in this process: {"rc", "out", "err"}."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def test_cli_import_eval_train_then_export_verify(runs, imported_and_trained, tmp_path):
    """Catches: an untied GQA byte model imported wrong (see the test above); an imported run
    that `menagerie eval` cannot restore or that `menagerie train` starts afresh instead of
    continuing (no "resumed from ... (step 0)"); an export --verify that passes without
    comparing or prints no numbers; a bfloat16 export verified against the float32 tolerance
    or written in float32."""
    run, imported, (said, evaluated, trained) = imported_and_trained
    _assert_same_model(imported, runs["untied-gqa-byte"])
    assert "checkpoint 0" in said
    assert evaluated.strip().splitlines()[-1].startswith("step 0: eval loss ")
    assert "(step 0)" in trained and "step 2/2" in trained and "final eval: loss" in trained
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        proc = _main(["export", str(run), "--format", "hf", "--out", str(out), "--dtype", dtype])
        assert proc["rc"] == 0, proc
        proc = _main(["export", str(run), "--format", "hf", "--out", str(out) + "-v", "--verify",
                      "--dtype", dtype])  # fmt: skip
        assert proc["rc"] == 0, proc
        line = next(x for x in proc["out"].splitlines() if x.startswith("verify"))
        assert "max |logit diff|" in line and "top-1 agreement" in line and "; ok (" in line
        config = json.loads((out / "config.json").read_text())
        assert config["torch_dtype"] == dtype
        with open(out / "model.safetensors", "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert header["model.norm.weight"]["dtype"] == {"float32": "F32", "bfloat16": "BF16"}[dtype]


def test_verify_fails_on_a_wrong_export(imported_and_trained, tmp_path, monkeypatch):
    """Catches: --verify comparing the run with itself, or exiting 0 beyond the tolerance."""
    run = imported_and_trained[0]
    real = hf_format.to_hf_state_dict

    def off_by_a_bit(model, params):
        state = real(model, params)
        state["model.norm.weight"] = state["model.norm.weight"] * 1.01
        return state

    monkeypatch.setattr(hf_format, "to_hf_state_dict", off_by_a_bit)
    proc = _main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "x"), "--verify"])
    assert proc["rc"] == 2 and "FAILED" in proc["out"], proc
    assert proc["err"].strip().startswith("error: the export in") and "differs" in proc["err"]


def _hf_dir(exports, tmp_path, case):
    """A copy of the untied GQA export, broken as `case` says."""
    src = tmp_path / "hf"
    shutil.copytree(exports["untied-gqa-byte"], src)
    config = json.loads((src / "config.json").read_text())
    if case == "not_llama":
        config["model_type"] = "gpt2"
    elif case == "vocab_too_small":
        config["vocab_size"] = 200
    elif case == "not_byte_level":
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        (src / "tokenizer.json").write_text(tok.to_str())
    elif case == "no_safetensors":
        (src / "model.safetensors").unlink()
    elif case == "partial":
        from safetensors.numpy import load_file, save_file

        tensors = load_file(src / "model.safetensors")
        del tensors["model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(config))
    return src


IMPORT_CASES = {
    "not_llama": "holds a 'gpt2' model (config.json model_type); import-hf reads Llama",
    "not_byte_level": "is a WordLevel tokenizer with Whitespace pre-tokenization; menagerie maps",
    "vocab_too_small": "holds 257 tokens but the model's embedding has vocab_size=200 rows",
    "no_safetensors": "has no model.safetensors",
    "partial": "has no tensor 'model.layers.1.mlp.down_proj.weight'; it is incomplete",
    "out_not_empty": "exists and is not an empty folder",
}


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_import_hf_refusals_say_why_in_one_line_and_write_nothing(exports, tmp_path, case):
    """Catches: a GPT-2 (or any non-Llama) folder imported as a Llama, a SentencePiece/WordLevel
    vocabulary imported as byte-level BPE (bits per byte would count wrong), token ids past the
    embedding, a missing or partial checkpoint imported with init values for the missing
    tensors, an import into a folder that holds files (or a half-written run left behind)."""
    src = _hf_dir(exports, tmp_path, case)
    out = tmp_path / "run"
    if case == "out_not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    proc = _main(["import-hf", str(src), "--out", str(out)])
    err = proc["err"].strip().splitlines()
    assert proc["rc"] == 2 and len(err) == 1 and IMPORT_CASES[case] in err[0], proc
    assert snapshot(tmp_path) == before


EXPORT_CASES = {
    "megalodon": "--format hf writes transformer models; ",
    "toy_ffn": "model.ffn.kind is 'toy_relu2', which LlamaForCausalLM cannot express",
    "planner": "model.head.kind is 'planner', which LlamaForCausalLM cannot express",
    "window": "this run's model.mixer.window is 8; use --format torch",
    "no_checkpoint": "has no checkpoint yet; train first",
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_hf_refusals_say_why_in_one_line_and_write_nothing(corpus, tmp_path, case):
    """Catches: a Megalodon run, or a transformer with a part Llama lacks (a squared-ReLU FFN, a
    planner whose plan conditions the LM, a local attention window), exported as a Llama; an
    export of a run with no checkpoint."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    model = {
        "megalodon": MEGALODON_TINY_MODEL,
        "toy_ffn": {"ffn": {"kind": "toy_relu2"}},
        "planner": {"head": {"kind": "planner"}},  # its plan conditions the LM
        "window": {"mixer": {"kind": "attention", "window": 8, "sinks": 2}},
        "no_checkpoint": {"d_model": 32, "n_layers": 1},
    }[case]
    cfg = {"model": model, "data": {"source": str(corpus)}, "train": {"seq_len": 32}}
    if case == "toy_ffn":
        cfg["imports"] = ["tests.train.toy_part"]
    if case == "no_checkpoint":  # the config a run writes before its first checkpoint
        cfg = build_config(cfg | {"model": model | {"vocab_size": 384}}).model_dump(mode="json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(tmp_path)
    proc = _main(["export", str(run_dir), "--format", "hf", "--out", str(out)])
    err = proc["err"].strip().splitlines()
    assert proc["rc"] == 2 and len(err) == 1 and EXPORT_CASES[case] in err[0], proc
    assert snapshot(tmp_path) == before
