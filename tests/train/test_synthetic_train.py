"""Synthetic tasks through the trainer and the CLI: the exact-match metric on hand-built logits,
the saved config's round trip, one-line errors for bad task configs, and a tiny transformer that
learns MQAR above chance, with `menagerie eval` printing the same accuracies."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from menagerie.train.cli import main
from menagerie.train.config import build_config, load_config, read_yaml, upgrade_saved
from menagerie.train.metrics import read_metrics
from menagerie.train.step import eval_report, exact_match_counts
from menagerie.train.trainer import describe_eval

from ..cli_testing import FAST_COMPILE_ENV
from ..jit_testing import quick_jit
from .conftest import ROOT, cli

MQAR_TINY = ROOT / "configs" / "synthetic" / "mqar_tiny.yaml"
LINREG_TINY = ROOT / "configs" / "synthetic" / "linreg_tiny.yaml"


def one_hot_logits(targets_BT: np.ndarray, vocab: int) -> np.ndarray:
    return np.eye(vocab, dtype=np.float32)[targets_BT] * 5.0 - 1.0


def counts(logits_BTV, targets_BT, mask_BT) -> dict[str, float]:
    pred_BT = jnp.argmax(jnp.asarray(logits_BTV), axis=-1)
    out = exact_match_counts(pred_BT, jnp.asarray(targets_BT), jnp.asarray(mask_BT))
    return {k: float(v) for k, v in out.items()}


def test_exact_match_on_hand_built_logits() -> None:
    """Catches accuracy counted on unmasked tokens, a sequence counted right when only some of
    its answers are, rows without answers counted as sequences, and argmax on the wrong axis."""
    targets = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]])
    mask = np.array([[0, 1, 0, 1, 1], [0, 0, 1, 0, 1], [0, 0, 0, 0, 0]], np.float32)
    logits = one_hot_logits(targets, 10)  # right everywhere but off the mask of row 1
    logits[1][mask[1] == 0] = one_hot_logits((targets[1][mask[1] == 0] + 1) % 10, 10)
    perfect = counts(logits, targets, mask)
    assert perfect == {"correct": 5.0, "seq_correct": 2.0, "sequences": 2.0}
    report = eval_report({"nll": 1.0, "tokens": 5.0, **perfect}, exact_match=True)
    assert report["accuracy"] == report["sequence_accuracy"] == 1.0

    logits[0, 3] = one_hot_logits(np.array(7), 10)  # one answer of row 0 wrong
    one_wrong = counts(logits, targets, mask)
    assert one_wrong == {"correct": 4.0, "seq_correct": 1.0, "sequences": 2.0}
    both = {k: perfect[k] + one_wrong[k] for k in perfect} | {"nll": 3.0, "tokens": 10.0}
    report = eval_report(both, exact_match=True)
    assert report == {
        "loss": 0.3,
        "accuracy": 0.9,
        "sequence_accuracy": 0.75,
        "tokens": 10.0,
        "sequences": 4.0,
    }
    assert describe_eval(report) == "loss 0.3000, accuracy 0.9000, sequence accuracy 0.7500"
    greedy = {f"greedy_{k}": v for k, v in perfect.items()}
    report = eval_report(both | greedy, exact_match=True)
    assert (report["greedy_accuracy"], report["greedy_sequence_accuracy"]) == (0.5, 0.5)
    assert describe_eval(report).endswith("greedy accuracy 0.5000, greedy sequence accuracy 0.5000")


def _greedy_by_hand(model, batch) -> np.ndarray:
    """Greedy decoding of each row's answers written directly: row by row, position by
    position, the whole row through the model, its argmax at t put back into the input at
    t + 1 when that input was the (teacher-forced) answer at t."""
    tokens, targets, mask = (np.asarray(batch[k]) for k in ("tokens", "targets", "loss_mask"))
    logits = quick_jit(lambda m, row: m(row[None]).logits[0])
    out = np.zeros_like(tokens)
    for b in range(tokens.shape[0]):
        row = tokens[b].copy()
        for t in range(tokens.shape[1]):
            out[b, t] = int(np.argmax(np.asarray(logits(model, jnp.asarray(row))[t])))
            if mask[b, t] and t + 1 < len(row) and tokens[b, t + 1] == targets[b, t]:
                row[t + 1] = out[b, t]
    return out


@pytest.mark.parametrize("mode", ["forward", "teacherless"])
def test_greedy_answers_read_back_their_own_predictions(mode) -> None:
    """`greedy_answers` equals greedy decoding written row by row, on a random model (wrong
    answers, so what is read back matters) over path-star rows. Catches: the teacher-forced
    answers left in the inputs (greedy = teacher-forced accuracy, the Clever-Hans number),
    a prediction put back one position off, a teacherless row's `$` inputs overwritten, rows
    decoded from the batch's first answer position computed wrong."""
    from flax import nnx
    from menagerie import arch
    from menagerie.data import PathStarConfig, SyntheticDataset
    from menagerie.train.step import greedy_answers

    task = PathStarConfig(degree=2, path_len=4, num_nodes=12, mode=mode)
    data = SyntheticDataset(task, "validation", task.length - 1)
    rows = [data.window(i, seed=0) for i in range(3)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    model_cfg = {"d_model": 32, "n_layers": 1, "vocab_size": data.tokenizer.vocab_size}
    model = arch.build(build_config({"model": model_cfg}).model, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    got = np.asarray(
        quick_jit(functools.partial(greedy_answers, graphdef))(nnx.to_pure_dict(params), batch)
    )
    mask = np.asarray(batch["loss_mask"]) > 0
    want = _greedy_by_hand(model, batch)
    np.testing.assert_array_equal(got[mask], want[mask])
    forced = np.asarray(jnp.argmax(quick_jit(lambda m, x: m(x).logits)(model, batch["tokens"]), -1))
    assert (got[mask] != forced[mask]).any() == (mode == "forward")


def test_text_eval_keeps_its_metrics() -> None:
    """Catches the synthetic metrics leaking into text runs (their metrics.jsonl rows and
    printed lines stay as they were: loss, bits per byte, tokens)."""
    sums = {"nll": 6.0, "tokens": 4.0, "bytes": 8.0, "correct": 2.0}
    sums |= {"seq_correct": 0.0, "sequences": 1.0}
    report = eval_report(sums, exact_match=False)
    assert set(report) == {"loss", "bits_per_byte", "tokens"}
    assert describe_eval(report, "  ") == f"loss 1.5000  bits/byte {6 / np.log(2) / 8:.4f}"


def test_model_metrics_are_averaged_over_eval_batches() -> None:
    """Catches a model's own metrics (a head's, a part's) summed over batches instead of
    averaged, or dropped from either kind of report."""
    sums = {"nll": 6.0, "tokens": 4.0, "bytes": 8.0, "batches": 4.0, "model/head/x": 2.0}
    assert eval_report(sums, exact_match=False)["model/head/x"] == 0.5
    sums |= {"correct": 2.0, "seq_correct": 0.0, "sequences": 1.0}
    plan = {"model/head/lookahead_accuracy": 3.0, "model/head/lookahead_block_accuracy": 1.0}
    report = eval_report(sums | plan, exact_match=True)
    assert (report["model/head/x"], report["model/head/lookahead_block_accuracy"]) == (0.5, 0.25)
    assert describe_eval(report).endswith("plan accuracy 0.7500, plan block accuracy 0.2500")
    written = eval_report(sums | {"model/head/writer_block_accuracy": 3.0}, exact_match=True)
    assert describe_eval(written).endswith("written block accuracy 0.7500")


@pytest.mark.parametrize("preset", [MQAR_TINY, LINREG_TINY], ids=lambda p: p.name)
def test_saved_config_round_trips(preset) -> None:
    """Catches a run folder's config.yaml that does not rebuild the run's task (the task saved
    as its base class, or a field lost) and overrides of task fields parsed as text."""
    cfg = load_config(preset, ["data.task.num_queries=2"])
    assert cfg.data.task.num_queries == 2
    again = build_config(upgrade_saved(yaml.safe_load(cfg.to_yaml())))
    assert again == cfg and type(again.data.task) is type(cfg.data.task)
    shorthand = load_config(None, ["data.source=synthetic", "data.task=linreg"])
    assert shorthand.data.task.kind == "linreg" and shorthand.data.task.modulus == 17


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data.task.kind=mqra"], "unknown data.task.kind 'mqra'; choose one of: linreg, mqar"),
        (["data.task.num_queries=9"], "data.task.num_queries=9 exceeds data.task.num_pairs=8"),
        (["data.task.num_pair=4"], "unknown config key 'data.task.num_pair' for kind 'mqar'"),
        (["data.task=null"], "data.source='synthetic' needs data.task"),
        (["train.seq_len=30"], "an instance is 33 tokens, so seq_len must be at least 32"),
    ],
)
def test_bad_task_config_is_one_line_through_the_cli(tmp_path, capsys, overrides, fragment):
    """Catches a bad task config reaching the user as a traceback or several lines, or
    failing only after the run folder was written."""
    run = tmp_path / "run"
    assert main(["train", "-c", str(MQAR_TINY), f"run_dir={run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not run.exists()


def test_tiny_transformer_learns_mqar_and_eval_prints_accuracy(tmp_path) -> None:
    """Catches a synthetic run that does not train end to end through the CLI (the sample of a
    text prompt, bits per byte, a vocabulary not taken from the task), eval metrics that are
    not the task's exact match, an eval command that disagrees with the run's final eval, and
    answers the model cannot learn (e.g. targets off their keys: accuracy stays at chance)."""
    run = tmp_path / "run"
    task = ["num_keys=16", "num_values=16", "num_pairs=4", "num_queries=4"]
    args = [
        "-c",
        str(MQAR_TINY),
        f"run_dir={run}",
        *(f"data.task.{t}" for t in task),
        "train.seq_len=16",
        "train.steps=60",
        "train.eval_every=30",
        "optim.lr=1e-2",
        "optim.warmup_steps=10",
        "checkpoint.every=0",
        "log.tensorboard=false",
        "model.vocab_multiple=1",
    ]
    trained = cli("train", *args, env=FAST_COMPILE_ENV)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "final eval: loss " in trained.stdout and "sample:" not in trained.stdout
    assert "bits/byte" not in trained.stdout
    assert read_yaml(run / "config.yaml")["model"]["vocab_size"] == 2 + 16 + 16

    evals = read_metrics(run, "eval")
    assert sorted(evals) == [30, 60]
    final = evals[60]
    assert {"loss", "accuracy", "sequence_accuracy", "tokens", "sequences"} <= set(final)
    assert {"greedy_accuracy", "greedy_sequence_accuracy"} <= set(final)
    assert "bits_per_byte" not in final
    assert (final["tokens"], final["sequences"]) == (4 * 32 * 4, 4 * 32)  # eval_batches x B (x Q)
    assert final["accuracy"] > 2 / 16, final  # chance: 1 / num_values

    evaluated = cli("eval", f"run_dir={run}", env=FAST_COMPILE_ENV)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stdout.strip().splitlines()[-1] == (
        f"step 60: eval loss {final['loss']:.4f}, accuracy {final['accuracy']:.4f}, "
        f"sequence accuracy {final['sequence_accuracy']:.4f}, greedy accuracy "
        f"{final['greedy_accuracy']:.4f}, greedy sequence accuracy "
        f"{final['greedy_sequence_accuracy']:.4f} over 512 answer tokens in 128 "
        "sequences"
    )
