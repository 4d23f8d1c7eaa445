"""Synthetic tasks (data.synthetic): rows are pure functions of (split, seed, index), the
answers are what each task's documented format says (recomputed here from the tokens alone),
the vocabulary is the task's, and bad task configs are one clear line."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
from menagerie.data import DataConfig, DataError, SyntheticDataset, open_datasets
from menagerie.data.synthetic import BOS_ID, FIRST_ID, PAD_ID, LinRegConfig, MQARConfig

MQAR = MQARConfig(num_keys=16, num_values=12, num_pairs=5, num_queries=3)
LINREG = LinRegConfig(modulus=11, num_pairs=4, num_queries=5)
KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def rows(ds: SyntheticDataset, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [ds.window(i, seed=seed) for i in range(n)]


def take(ds: SyntheticDataset, n: int, batch: int = 4, **kw) -> list[dict[str, np.ndarray]]:
    it = ds.batches(batch, **{"seed": 7, **kw})
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert set(x) == set(KEYS)
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_batch_k_is_a_pure_function_of_seed_and_k() -> None:
    """Catches a stateful generator (one Generator per dataset or per seed that each draw
    advances): batch 3 read alone, or by another instance or with worker threads, would differ
    from batch 3 read after batches 0-2; and seeding that ignores the seed or the row."""
    ds = SyntheticDataset(MQAR, "train", 24)
    sequential = take(ds, 6)
    assert_same_batches(take(ds, 3, start_step=3), sequential[3:])
    assert_same_batches(take(SyntheticDataset(MQAR, "train", 24), 1, start_step=3), sequential[3:4])
    threaded = SyntheticDataset(MQAR, "train", 24, num_workers=2, prefetch=0)
    assert_same_batches(take(threaded, 6), sequential)
    assert_same_batches([ds.window(13, seed=7, shuffle=False)], [ds.window(13, seed=7)])
    assert sequential[0]["tokens"].shape == (4, 24)
    other_seed = take(ds, 1, seed=8)[0]
    assert not np.array_equal(other_seed["tokens"], sequential[0]["tokens"])
    distinct_rows = {r.tobytes() for b in sequential for r in b["tokens"]}
    assert len(distinct_rows) == 6 * 4


def test_process_slices_concatenate_to_the_global_batch() -> None:
    """Catches a process drawing its rows by their local index (its slice's offset dropped):
    every process would read the first rows of the global batch."""
    ds = SyntheticDataset(LINREG, "train", 19)
    full = take(ds, 3, batch=4, seed=3)
    for count in (2, 4):
        for step in range(3):
            parts = [
                take(ds, 1, batch=4, seed=3, start_step=step, process_index=p, process_count=count)
                for p in range(count)
            ]
            for k in KEYS:
                np.testing.assert_array_equal(
                    np.concatenate([p[0][k] for p in parts]), full[step][k]
                )


def test_train_and_validation_streams_are_disjoint_and_eval_is_fixed() -> None:
    """Catches validation drawn from the training stream (the split not in the generator's
    seed): its rows would be training rows of seed 0; and eval batches that change between
    calls."""
    train, val = open_datasets(DataConfig(source="synthetic", task=MQARConfig()), 32)
    seen = {r["tokens"].tobytes() for seed in (0, 1) for r in rows(train, 256, seed)}
    held_out = [b["tokens"][i].tobytes() for b in val.eval_batches(8, 32) for i in range(8)]
    assert len(set(held_out)) == len(held_out) == 256
    assert not seen & set(held_out)
    again = [b["tokens"][i].tobytes() for b in val.eval_batches(8, 32) for i in range(8)]
    assert again == held_out
    with pytest.raises(DataError, match="pass the number of eval batches"):
        val.eval_batches(8)


def check_layout(row: dict[str, np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """The instance w (BOS first, PAD after, shifted by one into tokens/targets) and the
    input positions that carry loss."""
    w = np.append(row["tokens"], row["targets"][-1])
    np.testing.assert_array_equal(row["tokens"][1:], row["targets"][:-1])
    assert w[0] == BOS_ID and (w[length:] == PAD_ID).all() and (w[1:length] >= FIRST_ID).all()
    np.testing.assert_array_equal(row["segment_ids"], np.arange(len(w) - 1) < length)
    np.testing.assert_array_equal(row["positions"], np.arange(len(w) - 1))
    assert row["loss_mask"].dtype == np.float32 and set(np.unique(row["loss_mask"])) <= {0, 1}
    return w[:length], np.flatnonzero(row["loss_mask"])


@pytest.mark.parametrize(
    "task", [MQAR, MQARConfig(num_keys=3, num_values=2, num_pairs=3, num_queries=1), MQARConfig()]
)
def test_mqar_answers_are_the_values_of_the_asked_keys(task: MQARConfig) -> None:
    """Catches a query answered with another pair's value, a loss mask one token off (on the
    key, or on the token after the answer), repeated keys in a context, repeated queries, and
    ids outside the key / value ranges."""
    ds = SyntheticDataset(task, "validation", task.length - 1 + 3)
    n, q = task.num_pairs, task.num_queries
    keys = range(FIRST_ID, FIRST_ID + task.num_keys)
    values = range(FIRST_ID + task.num_keys, FIRST_ID + task.num_keys + task.num_values)
    for row in rows(ds, 200, seed=0):
        w, answer_at = check_layout(row, 1 + 2 * (n + q))
        context = w[1 : 1 + 2 * n].reshape(n, 2)
        assert all(k in keys for k in context[:, 0]) and all(v in values for v in context[:, 1])
        assert len(set(context[:, 0].tolist())) == n
        value_of = dict(context.tolist())
        np.testing.assert_array_equal(answer_at, 1 + 2 * n + 2 * np.arange(q))
        asked = row["tokens"][answer_at]
        assert len(set(asked.tolist())) == q and all(k in value_of for k in asked.tolist())
        np.testing.assert_array_equal(row["targets"][answer_at], [value_of[k] for k in asked])
        np.testing.assert_array_equal(w[2 + 2 * n :: 2], row["targets"][answer_at])


@pytest.mark.parametrize(
    "task", [LINREG, LinRegConfig(modulus=5, num_pairs=2, num_queries=3), LinRegConfig()]
)
def test_linreg_answers_follow_the_map_the_context_determines(task: LinRegConfig) -> None:
    """Catches answers off the instance's map (another a or b, a forgotten mod), a = 0, an x
    repeated (then a query could be a seen x, or two pairs fail to determine the map) and a
    loss mask one token off."""
    p, n, q = task.modulus, task.num_pairs, task.num_queries
    ds = SyntheticDataset(task, "train", task.length - 1)
    slopes = set()
    for row in rows(ds, 200, seed=5):
        w, answer_at = check_layout(row, 1 + 2 * (n + q))
        xy = (w[1:] - FIRST_ID).reshape(n + q, 2)
        assert (xy < p).all() and len(set(xy[:, 0].tolist())) == n + q
        (x0, y0), (x1, y1) = xy[0], xy[1]
        a = (y1 - y0) * pow(int(x1 - x0), -1, p) % p  # two distinct x determine y = a x + b
        b = (y0 - a * x0) % p
        assert a != 0
        slopes.add(int(a))
        np.testing.assert_array_equal(xy[:, 1], (a * xy[:, 0] + b) % p)
        np.testing.assert_array_equal(answer_at, 1 + 2 * n + 2 * np.arange(q))
        np.testing.assert_array_equal(row["targets"][answer_at] - FIRST_ID, xy[n:, 1])
    assert slopes == set(range(1, p))  # every slope a in [1, p) occurs


def test_vocabulary_is_the_tasks_and_names_round_trip() -> None:
    """Catches a vocabulary written apart from the task (a count that misses the specials or a
    range), and encode / decode that disagree with the ids the rows hold."""
    ds = SyntheticDataset(MQAR, "train", MQAR.length - 1)
    tok = ds.tokenizer
    assert tok.vocab_size == FIRST_ID + 16 + 12 and tok.eos_id == PAD_ID
    assert not tok.token_bytes.any() and tok.token_bytes.shape == (tok.vocab_size,)
    row = ds.window(0, seed=0)
    text = tok.decode(row["tokens"])
    np.testing.assert_array_equal(tok.encode(text), row["tokens"][1:])  # BOS dropped
    assert text.split()[0].startswith("k") and text.split()[1].startswith("v")
    assert tok.encode("k0 v11 k15").tolist() == [2, 2 + 16 + 11, 2 + 15]
    with pytest.raises(DataError, match="'v12' is not a token of task 'mqar'; did you mean"):
        tok.encode("k1 v12")
    lin = SyntheticDataset(LINREG, "train", 40).tokenizer
    assert lin.vocab_size == FIRST_ID + 11 and lin.decode([1, 2, 12, 0]) == " 0 10"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"source": "synthetic"}, "data.source='synthetic' needs data.task; choose one of:"),
        ({"task": "mqar"}, "data.task is set (kind 'mqar') but data.source is 'stdlib'"),
        ({"source": "synthetic", "task": "nope"}, "unknown data.task.kind 'nope'; choose"),
        ({"source": "synthetic", "task": {"num_pairs": 4}}, "data.task.kind is missing"),
        (
            {"source": "synthetic", "task": {"kind": "mqar", "num_pair": 4}},
            "unknown config key 'data.task.num_pair' for kind 'mqar'; did you mean 'num_pairs'",
        ),
        (
            {"source": "synthetic", "task": {"kind": "mqar", "num_queries": 9}},
            "data.task.num_queries=9 exceeds data.task.num_pairs=8",
        ),
        (
            {"source": "synthetic", "task": {"kind": "mqar", "num_keys": 4}},
            "data.task.num_pairs=8 exceeds data.task.num_keys=4",
        ),
        ({"source": "synthetic", "task": {"kind": "linreg", "modulus": 15}}, "must be prime"),
        (
            {"source": "synthetic", "task": {"kind": "linreg", "num_pairs": 10}},
            "num_pairs + num_queries = 18 exceeds data.task.modulus=17",
        ),
        (
            {"source": "synthetic", "task": {"kind": "linreg", "num_pairs": 1}},
            "data.task.num_pairs=1 must be at least 2",
        ),
        ({"source": "synthetic", "task": "mqar", "tokenizer": "bpe"}, "does not apply"),
    ],
)
def test_bad_task_configs_are_refused(raw: dict, fragment: str) -> None:
    """Catches each check missing (a config that validates, then fails or misleads later)."""
    with pytest.raises(pydantic.ValidationError) as err:
        DataConfig.model_validate(raw)
    assert fragment in str(err.value)


def test_task_configs_round_trip_and_short_rows_are_refused() -> None:
    """Catches a task serialised as its base class (only `kind` saved, so a run folder's config
    comes back with the default task) and a seq_len too short for an instance accepted."""
    cfg = DataConfig(source="synthetic", task={"kind": "linreg", "modulus": 13, "num_queries": 3})
    dumped = cfg.model_dump(mode="json")
    assert dumped["task"] == {"kind": "linreg", "modulus": 13, "num_pairs": 8, "num_queries": 3}
    assert DataConfig.model_validate(dumped) == cfg
    assert DataConfig(source="synthetic", task="mqar").task == MQARConfig()
    with pytest.raises(DataError, match="an instance is 23 tokens, so seq_len must be at least 22"):
        open_datasets(DataConfig(source="synthetic", task=cfg.task), 21)
