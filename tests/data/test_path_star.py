"""The path-star task (data.path_star): rows in the published format of Next-Token-Failures (a
frozen row, published lines read by the same checker as ours), every instance a star with one
source-to-goal path and the loss on exactly that path, teacherless inputs hiding the path while
its targets stay, other tasks' rows unchanged by the `model_inputs` hook, and bad configs one
clear line."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pydantic
import pytest
from menagerie.data import DataConfig, PathStarConfig, SyntheticDataset
from menagerie.data.synthetic import BOS_ID, PAD_ID, LinRegConfig, MQARConfig
from menagerie.train.config import load_config

SMALL = PathStarConfig(degree=2, path_len=3, num_nodes=10)
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "synthetic"


def names(ds: SyntheticDataset, ids: np.ndarray) -> str:
    return " ".join(ds.tokenizer.names[i] for i in ids)


def read_instance(words: list[str], degree: int, path_len: int) -> tuple[list[int], list[int]]:
    """The source-to-goal path of one instance written as token names (BOS and commas dropped),
    `u v | ... | u v / s g = path`, and the path as written. Fails unless the edge list is a
    star of `degree` arms with `path_len` nodes each (the source included), every edge parent
    first, labels distinct, and the goal ends an arm. The path is the unique one in the tree:
    the goal's parents up to the source."""
    e = degree * (path_len - 1)
    assert len(words) == 3 * e + 3 + path_len
    edge_words, query = words[: 3 * e - 1], words[3 * e - 1 : 3 * e + 3]
    assert edge_words[2::3] == ["|"] * (e - 1)
    assert query[0] == "/" and query[3] == "="
    source, goal = int(query[1]), int(query[2])
    edges = [(int(u), int(v)) for u, v in zip(edge_words[0::3], edge_words[1::3], strict=True)]
    parent = {v: u for u, v in edges}
    assert len(parent) == e and source not in parent  # each node but the source has one parent
    assert len({source, *parent}) == 1 + e  # labels distinct
    children: dict[int, list[int]] = {}
    for u, v in edges:
        children.setdefault(u, []).append(v)
    assert len(children[source]) == degree
    for first in children[source]:  # each arm a chain of path_len - 1 nodes
        chain = [first]
        while chain[-1] in children:
            assert len(children[chain[-1]]) == 1
            chain += children[chain[-1]]
        assert len(chain) == path_len - 1
    path = [goal]
    while path[-1] != source:
        path.append(parent[path[-1]])
    assert len(path) == path_len and goal not in children  # the goal ends an arm
    return path[::-1], [int(x) for x in words[-path_len:]]


def read_row(row: dict[str, np.ndarray], task: PathStarConfig) -> list[int]:
    """The checked instance of a row (see `read_instance`), its layout (BOS, PAD after), and the
    loss on exactly the path tokens, written source first (goal first in reverse mode)."""
    n, width = task.length, len(row["targets"]) + 1
    w = np.append(BOS_ID, row["targets"])
    assert (w[n:] == PAD_ID).all() and (w[1:n] != PAD_ID).all()
    np.testing.assert_array_equal(row["segment_ids"], np.arange(width - 1) < n)
    np.testing.assert_array_equal(row["positions"], np.arange(width - 1))
    assert row["tokens"][0] == BOS_ID and (row["tokens"][n:] == PAD_ID).all()
    words = SyntheticDataset(task, "train", width - 1).tokenizer.decode(w[:n]).split()
    path, written = read_instance(words, task.degree, task.path_len)
    assert written == (path[::-1] if task.mode == "reverse" else path)
    assert row["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(
        np.flatnonzero(row["loss_mask"]), np.arange(n - 1 - len(path), n - 1)
    )
    return path


@pytest.mark.parametrize(
    "mode, inputs, targets",
    [
        (
            "forward",
            "<bos> 3 5 | 7 2 | 4 3 | 4 7 / 4 2 = 4 7 2",
            "3 5 | 7 2 | 4 3 | 4 7 / 4 2 = 4 7 2 <pad>",
        ),
        (
            "teacherless",
            "<bos> 3 5 | 7 2 | 4 3 | 4 7 / 4 2 = $ $ $",
            "3 5 | 7 2 | 4 3 | 4 7 / 4 2 = 4 7 2 <pad>",
        ),
        (
            "reverse",
            "<bos> 3 5 | 7 2 | 4 3 | 4 7 / 4 2 = 2 7 4",
            "3 5 | 7 2 | 4 3 | 4 7 / 4 2 = 2 7 4 <pad>",
        ),
    ],
)
def test_a_fixed_row_is_in_the_published_format(mode: str, inputs: str, targets: str) -> None:
    """Frozen after a check by hand: G(2, 3) with source 4, arms 4-3-5 and 4-7-2, goal 2; edges
    parent first, shuffled as edges, `|` between them, `/ s g =`, the path with its source; the
    loss on the 3 path tokens; teacherless `$` from the first path input on (`=` stays, as the
    official x[num_prefix_tokens:]); reverse writes 2 7 4 and keeps `/ 4 2 =`. Catches any
    change of format: the path without its source (seen failing), `/` and `=` swapped, reverse
    turning the prefix too, `$` over the `=` or the loss mask a token off."""
    task = SMALL.model_copy(update={"mode": mode})
    ds = SyntheticDataset(task, "train", task.length)
    row = ds.window(0, seed=0)
    assert names(ds, row["tokens"]) == inputs
    assert names(ds, row["targets"]) == targets
    assert row["loss_mask"].tolist() == [0.0] * 15 + [1.0] * 3 + [0.0]


# Next-Token-Failures data/datasets/graphs/: deg_2_path_3_nodes_10_test, deg_5_path_3_nodes_50_test
PUBLISHED = [
    ((2, 3, 10), "2,8|5,2|5,9|9,3/5,8=5,2,8", [5, 2, 8]),
    ((2, 3, 10), "1,6|1,5|5,3|6,2/1,2=1,6,2", [1, 6, 2]),
    ((5, 3, 50), "9,32|4,46|25,37|10,25|0,43|10,9|10,7|10,0|10,4|7,48/10,32=10,9,32", [10, 9, 32]),
]


@pytest.mark.parametrize("shape, line, path", PUBLISHED)
def test_published_lines_read_as_our_instances(shape: tuple, line: str, path: list[int]) -> None:
    """The checker that reads our rows reads the official files' lines (split into numbers and
    separators, commas dropped, as the numeral tokenizer does) to the same path, and our
    tokenizer encodes them. Catches the format here and the checker drifting together away
    from the published one (edges child first, the path without its source, `=` elsewhere)."""
    degree, path_len, num_nodes = shape
    words = re.findall(r"\d+|[|=/$]", line)
    assert read_instance(words, degree, path_len) == (path, path)
    task = PathStarConfig(degree=degree, path_len=path_len, num_nodes=num_nodes)
    ids = SyntheticDataset(task, "train", task.length).tokenizer.encode(" ".join(words))
    assert len(ids) == task.length - 1


@pytest.mark.parametrize(
    "task",
    [
        PathStarConfig(),
        PathStarConfig(degree=5, mode="reverse"),
        PathStarConfig(degree=3, path_len=4, num_nodes=10, mode="teacherless"),
        PathStarConfig(degree=1, path_len=2, num_nodes=2),
    ],
)
def test_every_instance_is_a_star_with_one_path(task: PathStarConfig) -> None:
    """Catches arms of the wrong length or count, repeated labels, edges written child first,
    a goal that does not end an arm or a path that is not the unique one to it, a loss mask
    off the path (one token off, or missing the source that the official loss reads), labels
    from a range missing its top (`choice(N - 1)`), and an edge list left in arm order (seen
    failing with the shuffle removed: the goal's edge then sits at one place)."""
    ds = SyntheticDataset(task, "validation", task.length + 2)
    e, labels, goal_edge_at = task.num_edges, set(), set()
    for i in range(200):
        row = ds.window(i, seed=0)
        path = read_row(row, task)
        words = ds.tokenizer.decode(row["targets"]).split()
        labels |= {int(x) for x in words[: 3 * e - 1 : 3] + words[1 : 3 * e - 1 : 3]}
        goal_edge_at.add(words[1 : 3 * e - 1 : 3].index(str(path[-1])))
    assert labels == set(range(task.num_nodes))
    assert goal_edge_at == set(range(e))


def test_teacherless_hides_the_path_and_keeps_the_targets() -> None:
    """The same draw in the three modes: forward inputs are the targets shifted by one;
    teacherless inputs differ from them exactly at the path's inputs, which are `$`, with the
    targets, loss and segments of forward mode; reverse targets are the path turned. Catches
    `$` written into the targets (nothing left to learn), `$` also over the prefix's `=` or
    short of the path, teacherless rows that are forward rows (the hook not called: seen
    failing), and `$` leaking into the other modes."""
    rows = {}
    for mode in ("forward", "teacherless", "reverse"):
        task = PathStarConfig(degree=3, path_len=4, mode=mode)
        rows[mode] = SyntheticDataset(task, "train", task.length + 1).window(5, seed=2)
    fwd, tl, rev = rows["forward"], rows["teacherless"], rows["reverse"]
    dollar = task.separator_id("$")
    np.testing.assert_array_equal(fwd["tokens"][1:], fwd["targets"][:-1])
    np.testing.assert_array_equal(rev["tokens"][1:], rev["targets"][:-1])
    for key in ("targets", "loss_mask", "segment_ids", "positions"):
        np.testing.assert_array_equal(tl[key], fwd[key])
    path_inputs = np.arange(task.length - task.path_len, task.length)  # the input at the goal too
    hidden = np.flatnonzero(tl["tokens"] != fwd["tokens"])
    np.testing.assert_array_equal(hidden, path_inputs)
    assert (tl["tokens"][hidden] == dollar).all()
    assert dollar not in fwd["tokens"] and dollar not in rev["tokens"]
    assert dollar not in tl["targets"]
    path_targets = np.flatnonzero(fwd["loss_mask"])
    np.testing.assert_array_equal(rev["targets"][path_targets], fwd["targets"][path_targets][::-1])


def digest(ds: SyntheticDataset, n: int = 8, seed: int = 3) -> str:
    h = hashlib.sha256()
    for i in range(n):
        row = ds.window(i, seed=seed)
        for k in sorted(row):
            h.update(f"{k} {row[k].dtype} {row[k].shape}".encode())
            h.update(row[k].tobytes())
    return h.hexdigest()[:16]


def test_other_tasks_rows_are_unchanged_by_the_inputs_hook() -> None:
    """Hashes of MQAR and linreg rows (keys, dtypes, shapes, bytes) taken before
    `model_inputs` existed. Catches the hook changing teacher-forced rows: inputs no longer the
    PAD-padded instance, a dtype changed by the copy, or a key added or renamed."""
    assert digest(SyntheticDataset(MQARConfig(), "train", 40)) == "ffc55cc849a210c8"
    linreg = LinRegConfig(modulus=11, num_pairs=4, num_queries=5)
    assert digest(SyntheticDataset(linreg, "validation", 19)) == "3e45f43bab6a35de"


def test_rows_are_pure_functions_of_split_seed_and_index() -> None:
    """Catches a generator that carries state between rows (row 9 read after rows 0-8 would
    differ from row 9 read alone or by a batch starting there), and a draw that ignores the
    split or the seed."""
    task = PathStarConfig(mode="teacherless")
    ds = SyntheticDataset(task, "train", task.length - 1)
    ahead = ds.window(9, seed=4)
    in_order = [ds.window(i, seed=4) for i in range(10)]
    for k in ahead:
        np.testing.assert_array_equal(ahead[k], in_order[9][k])
    batch = next(ds.batches(2, seed=4, start_step=4))  # rows 8 and 9
    np.testing.assert_array_equal(batch["tokens"][1], ahead["tokens"])
    other_split = SyntheticDataset(task, "validation", task.length - 1).window(9, seed=4)
    assert not np.array_equal(other_split["targets"], ahead["targets"])
    assert not np.array_equal(ds.window(9, seed=5)["targets"], ahead["targets"])


def test_vocabulary_is_the_labels_then_the_separators() -> None:
    """Catches separators out of the official tokenizer's order (`|`, `=`, `/`, `$` after the N
    labels), a vocabulary missing the specials or `$`, and names that do not round-trip."""
    task = PathStarConfig(num_nodes=12)
    tok = SyntheticDataset(task, "train", task.length - 1).tokenizer
    assert tok.vocab_size == 2 + 12 + 4
    assert tok.names[2:] == [str(n) for n in range(12)] + ["|", "=", "/", "$"]
    assert [task.separator_id(s) for s in "|=/$"] == [14, 15, 16, 17]
    assert tok.encode("0 11 | = / $").tolist() == [2, 13, 14, 15, 16, 17]
    assert tok.decode(tok.encode("3 4 | 3 5 / 3 5 = 3 5")) == " 3 4 | 3 5 / 3 5 = 3 5"


@pytest.mark.parametrize(
    "task, fragment",
    [
        ({"degree": 0}, "data.task.degree=0 must be at least 1"),
        ({"path_len": 1}, "data.task.path_len=1 must be at least 2"),
        (
            {"degree": 5, "path_len": 11},
            "data.task: G(5, 11) has 51 nodes, more than data.task.num_nodes=50",
        ),
        ({"mode": "backward"}, "Input should be 'forward', 'teacherless' or 'reverse'"),
        (
            {"path_length": 5},
            "unknown config key 'data.task.path_length' for kind 'path_star'; did",
        ),
    ],
)
def test_bad_configs_are_refused(task: dict, fragment: str) -> None:
    """Catches each check missing: a star that cannot be drawn (no arm, a path with no edge,
    more nodes than labels: `choice` would fail at the first row, or repeat labels) and a
    misspelt key or mode accepted."""
    with pytest.raises(pydantic.ValidationError) as err:
        DataConfig.model_validate({"source": "synthetic", "task": {"kind": "path_star", **task}})
    assert fragment in str(err.value)


@pytest.mark.parametrize("name, degree", [("path_star_g2_5", 2), ("path_star_g5_5", 5)])
def test_presets_load_with_one_instance_per_row(name: str, degree: int) -> None:
    """Catches a preset whose seq_len is not its instance length minus one (too short is
    refused at the first batch; longer pads every row), or whose graph is not its name's."""
    cfg = load_config(PRESETS / f"{name}.yaml")
    assert (cfg.data.task.degree, cfg.data.task.path_len) == (degree, 5)
    assert cfg.train.seq_len == cfg.data.task.length - 1
