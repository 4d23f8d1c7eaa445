"""Synthetic in-context tasks, generated on the fly: batch k is a pure function of (seed, k).

    data: {source: synthetic, task: {kind: mqar, num_pairs: 8, num_queries: 8}}

A task is one `TaskConfig` subclass (`data.config`): its fields are its options, `token_names()`
its own tokens (ids from `FIRST_ID`; 0 is PAD, 1 is BOS in every task) and `draw(rng)` one
instance, a BOS-led row of `length` token ids with a mask of its answer tokens: the only tokens
the loss and the exact-match metric read. Defining the class registers its kind; a task in
another module is selectable once that module is in the run's `imports:`.

Both tasks here show `num_pairs` (input, output) pairs, then `num_queries` more pairs whose
outputs are the answers, 1 + 2 (num_pairs + num_queries) tokens (teacher forcing: an answer is
also the input after it, so later queries see earlier answers):

    mqar    BOS k v k v ... | k v k v ...   (Zoology's multi-query associative recall: distinct
            keys, values drawn independently; each query repeats a different key of the context.
            Zoology spreads its queries over a fixed length with noise tokens between them; here
            they follow the pairs directly)
    linreg  BOS x y x y ... | x y x y ...   (in-context linear regression over Z_p: one random
            y = (a x + b) mod p per instance, a != 0, every x distinct, so queries are unseen x)

The path-star task (Bachmann & Nagarajan 2024) is built in too, in `data.path_star`.

`SyntheticDataset` lays one instance per row of seq_len + 1 tokens, PAD after it (segment 0, no
loss); targets are w[1:], so loss_mask[t] marks the answer at w[t + 1], and inputs are x[:-1],
where x is the task's `model_inputs` of w: w itself (teacher forcing) unless the task hides
answers from the model (path-star's teacherless mode). Row g of a split comes from
np.random.default_rng([split stream, seed, g]): any process count reads the same rows, resuming
replays nothing, and validation (stream 1, seed 0) never shares a generator with training
(stream 0, any seed).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pydantic

from .config import DataConfig, TaskConfig
from .errors import DataError
from .pipeline import _FOREVER, Batch, IndexedDataset

SPECIAL_TOKENS = ("<pad>", "<bos>")
PAD_ID, BOS_ID = 0, 1
FIRST_ID = len(SPECIAL_TOKENS)
"""Id of a task's first own token."""
_STREAMS = {"train": 0, "validation": 1}


def pairs_then_queries(
    context_N2: np.ndarray, queries_Q2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """BOS, the context pairs, the query pairs, as ids [1 + 2(N + Q)] int32 and the answer mask
    (the second token of each query pair) [1 + 2(N + Q)] bool."""
    tokens = np.concatenate([[BOS_ID], context_N2.ravel(), queries_Q2.ravel()]).astype(np.int32)
    answer = np.zeros(len(tokens), bool)
    answer[1 + context_N2.size + 1 :: 2] = True
    return tokens, answer


def _check_at_least(task: TaskConfig, **bounds: int) -> None:
    for name, low in bounds.items():
        if getattr(task, name) < low:
            raise ValueError(f"data.task.{name}={getattr(task, name)} must be at least {low}")


class MQARConfig(TaskConfig):
    """Multi-query associative recall (Zoology, Arora et al. 2023): `num_pairs` key-value pairs
    with distinct keys, then `num_queries` of those keys (distinct, random order), each followed
    by its value. Key i is token "k{i}", value j is "v{j}"."""

    kind: Literal["mqar"] = "mqar"
    num_keys: int = 64
    """Keys in the vocabulary."""
    num_values: int = 64
    """Values in the vocabulary."""
    num_pairs: int = 8
    """Key-value pairs shown before the queries (at most `num_keys`: keys are distinct)."""
    num_queries: int = 8
    """Keys asked after the pairs (at most `num_pairs`: each asks a different one)."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> MQARConfig:
        _check_at_least(self, num_keys=1, num_values=1, num_pairs=1, num_queries=1)
        if self.num_pairs > self.num_keys:
            raise ValueError(
                f"data.task.num_pairs={self.num_pairs} exceeds data.task.num_keys="
                f"{self.num_keys} (the keys of an instance are distinct); raise num_keys"
            )
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"data.task.num_queries={self.num_queries} exceeds data.task.num_pairs="
                f"{self.num_pairs} (each query asks a different key); lower num_queries"
            )
        return self

    def token_names(self) -> list[str]:
        return [f"k{i}" for i in range(self.num_keys)] + [f"v{j}" for j in range(self.num_values)]

    @property
    def length(self) -> int:
        return 1 + 2 * (self.num_pairs + self.num_queries)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        keys = rng.choice(self.num_keys, self.num_pairs, replace=False)
        values = rng.integers(self.num_values, size=self.num_pairs)
        asked = rng.choice(self.num_pairs, self.num_queries, replace=False)
        pairs_N2 = np.stack([FIRST_ID + keys, FIRST_ID + self.num_keys + values], axis=1)
        return pairs_then_queries(pairs_N2, pairs_N2[asked])


class LinRegConfig(TaskConfig):
    """In-context linear regression over the integers mod a prime p: each instance draws
    y = (a x + b) mod p with a in [1, p) and b in [0, p), shows `num_pairs` (x, y) pairs, then
    asks `num_queries` new x. All x of an instance are distinct, so two pairs determine a and b
    and a query is never a repeat. Residue n is token "n" (x and y share the tokens)."""

    kind: Literal["linreg"] = "linreg"
    modulus: int = 17
    """The prime p."""
    num_pairs: int = 8
    """(x, y) pairs shown before the queries (at least 2, which determine the map)."""
    num_queries: int = 8
    """x asked after the pairs; num_pairs + num_queries is at most p (distinct x)."""

    @pydantic.model_validator(mode="after")
    def _check(self) -> LinRegConfig:
        _check_at_least(self, modulus=2, num_pairs=2, num_queries=1)
        p = self.modulus
        if any(p % d == 0 for d in range(2, int(p**0.5) + 1)):
            raise ValueError(
                f"data.task.modulus={p} must be prime (only then do two pairs determine "
                "y = a x + b mod p)"
            )
        if self.num_pairs + self.num_queries > p:
            raise ValueError(
                f"data.task.num_pairs + num_queries = {self.num_pairs + self.num_queries} exceeds "
                f"data.task.modulus={p} (the x of an instance are distinct); raise the modulus"
            )
        return self

    def token_names(self) -> list[str]:
        return [str(n) for n in range(self.modulus)]

    @property
    def length(self) -> int:
        return 1 + 2 * (self.num_pairs + self.num_queries)

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = self.modulus
        a, b = rng.integers(1, p), rng.integers(p)
        x = rng.choice(p, self.num_pairs + self.num_queries, replace=False)
        xy_M2 = FIRST_ID + np.stack([x, (a * x + b) % p], axis=1)
        return pairs_then_queries(xy_M2[: self.num_pairs], xy_M2[self.num_pairs :])


class TaskTokenizer:
    """A task's tokens by name: "<pad>", "<bos>", then `task.token_names()`. `encode` reads names
    separated by white space (a prompt like the training rows starts with "<bos>"), `decode`
    writes each token as a space and its name (specials dropped, so that streamed pieces join);
    the tokens have no bytes (`token_bytes` is all 0: bits per byte do not apply). PAD, which
    follows an instance, is EOS."""

    eos_id = PAD_ID

    def __init__(self, task: TaskConfig) -> None:
        self.task = task
        self.names = [*SPECIAL_TOKENS, *task.token_names()]
        self.vocab_size = len(self.names)
        self.token_bytes = np.zeros(self.vocab_size, np.int32)
        self._ids = {name: i for i, name in enumerate(self.names)}

    def encode(self, text: str) -> np.ndarray:
        ids = []
        for name in text.split():
            if name not in self._ids:
                close = difflib.get_close_matches(name, self.names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise DataError(
                    f"{name!r} is not a token of task {self.task.kind!r}; {hint}write token "
                    f"names separated by spaces ({self.names[FIRST_ID]}, ...)"
                )
            ids.append(self._ids[name])
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        kept = (int(i) for i in ids if FIRST_ID <= int(i) < self.vocab_size)
        return "".join(f" {self.names[i]}" for i in kept)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "synthetic", "task": self.task.model_dump(mode="json")}


class SyntheticDataset(IndexedDataset):
    """One split of a task's endless stream, one instance per row of `seq_len` + 1 tokens.

    Attributes: `task`, `tokenizer` (a `TaskTokenizer`), `split`, `seq_len`. `shuffle` is not
    read (every row is a fresh draw) and there are no epochs; `eval_batches` needs a count.
    """

    def __init__(
        self,
        task: TaskConfig,
        split: str,
        seq_len: int,
        *,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if split not in _STREAMS:
            raise DataError(f"split={split!r} is unknown; use 'train' or 'validation'")
        if seq_len + 1 < task.length:
            raise DataError(
                f"train.seq_len={seq_len} is too short for data.task {task.kind!r}: an instance "
                f"is {task.length} tokens, so seq_len must be at least {task.length - 1}"
            )
        self.task, self.split, self.seq_len = task, split, seq_len
        self.num_workers, self.prefetch = num_workers, prefetch
        self.tokenizer = TaskTokenizer(task)
        self.token_bytes = self.tokenizer.token_bytes
        self.windows_per_epoch = _FOREVER

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str, seq_len: int) -> SyntheticDataset:
        """The dataset of `cfg.task` over `split`, with cfg's workers and prefetch."""
        if cfg.task is None:
            raise DataError("data.task is not set; choose a synthetic task (e.g. data.task=mqar)")
        return cls(cfg.task, split, seq_len, num_workers=cfg.num_workers, prefetch=cfg.prefetch)

    def window(self, index: int, *, seed: int, shuffle: bool = True) -> Batch:
        """Row `index` of this split for `seed`: tokens (the model's inputs) / targets /
        segment_ids / positions [T] int32, loss_mask [T] float32 (1 where the target is an
        answer)."""
        rng = np.random.default_rng([_STREAMS[self.split], seed, int(index)])
        tokens_L, answer_L = self.task.draw(rng)
        inputs_L = self.task.model_inputs(tokens_L, answer_L)
        n, width = len(tokens_L), self.seq_len + 1
        w, x = np.full(width, PAD_ID, np.int32), np.full(width, PAD_ID, np.int32)
        w[:n], x[:n] = tokens_L, inputs_L
        answer = np.zeros(width, bool)
        answer[:n] = answer_L
        seg = (np.arange(width) < n).astype(np.int32)
        return {
            "tokens": x[:-1],
            "targets": w[1:],
            "segment_ids": seg[:-1],
            "positions": np.arange(self.seq_len, dtype=np.int32),
            "loss_mask": answer[1:].astype(np.float32),
        }

    def eval_batches(self, global_batch_size: int, num_batches: int | None = None, **kw):
        """The first `num_batches` batches of the validation stream (seed 0), on every call."""
        if num_batches is None:
            raise DataError("a synthetic stream has no end: pass the number of eval batches")
        return super().eval_batches(global_batch_size, num_batches, **kw)
