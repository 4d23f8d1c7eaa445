"""`DataConfig`: where documents come from, how they are tokenized and split; `TaskConfig`: the
slot of a synthetic task (the tasks themselves live in `data.synthetic` and `data.path_star`)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic
from pydantic import SerializeAsAny

if TYPE_CHECKING:
    import numpy as np

SYNTHETIC = "synthetic"
"""The `data.source` of generated tasks."""


def _check_task_keys(task: type[pydantic.BaseModel], raw: dict[str, Any]) -> None:
    """ValueError with a did-you-mean for the first key of `raw` that `task` does not have."""
    fields = list(task.model_fields)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(fields)}"
            raise ValueError(
                f"unknown config key 'data.task.{key}' for kind {raw['kind']!r}; {hint}"
            )


class TaskConfig(pydantic.BaseModel):
    """The `data.task:` slot: one synthetic in-context task. Each task subclasses this with a
    `Literal` default for `kind`; defining the class registers it (as `arch` parts do), so a
    mapping here is validated as the class its kind names and `task: mqar` is `{kind: mqar}`.

    A task fixes its vocabulary (`token_names`, after the specials every task shares), draws
    one instance from a numpy Generator (`draw`) and may show the model other inputs than the
    instance's tokens (`model_inputs`); `data.synthetic` lays instances into rows."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        strict=True,
    )
    choices: ClassVar[dict[str, type[TaskConfig]]] = {}

    kind: str
    """Which task: a registered kind (mqar, linreg, ...)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        kind = cls.model_fields["kind"].default
        if isinstance(kind, str):
            taken = TaskConfig.choices.get(kind)
            if taken is not None and taken.__qualname__ != cls.__qualname__:
                raise TypeError(f"task kind '{kind}' is taken by {taken.__qualname__}")
            TaskConfig.choices[kind] = cls

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, value: Any, handler: Any) -> Any:
        if cls is not TaskConfig or not isinstance(value, str | dict):
            return handler(value)
        raw = {"kind": value} if isinstance(value, str) else value
        known = ", ".join(sorted(TaskConfig.choices))
        if "kind" not in raw:
            raise ValueError(f"data.task.kind is missing; choose one of: {known}")
        task = TaskConfig.choices.get(raw["kind"])
        if task is None:
            raise ValueError(f"unknown data.task.kind {raw['kind']!r}; choose one of: {known}")
        _check_task_keys(task, raw)
        return task.model_validate(raw)

    def token_names(self) -> list[str]:
        """Names of the task's own tokens, in id order after the shared specials."""
        raise NotImplementedError(f"task {self.kind!r} does not define token_names()")

    @property
    def length(self) -> int:
        """Tokens in one instance (BOS included)."""
        raise NotImplementedError(f"task {self.kind!r} does not define length")

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One instance: token ids [length] int32 and whether each is an answer [length] bool
        (the tokens the loss and the exact-match metric read)."""
        raise NotImplementedError(f"task {self.kind!r} does not define draw()")

    def model_inputs(self, tokens_L: np.ndarray, answer_L: np.ndarray) -> np.ndarray:
        """The instance as the model reads it [length] int32, from `draw`'s tokens and answer
        mask. By default the tokens themselves (teacher forcing: the inputs are the targets
        shifted by one); a task whose inputs hide some targets (path-star's teacherless mode)
        overrides this."""
        return tokens_L


class DataConfig(pydantic.BaseModel):
    """The `data:` section of a run config."""

    model_config = pydantic.ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        allow_inf_nan=False,
        strict=True,
    )

    source: str = "stdlib"
    """Documents to train on. "stdlib": the running interpreter's standard-library `.py` files
    (site-packages excluded, sorted by relative path). "synthetic": instances of `task`,
    generated on the fly (no files; the task fixes the vocabulary, and `tokenizer`, `text_field`,
    `bpe_vocab_size`, `val_fraction` and `cache_dir` are not read). Otherwise a path to a
    .txt/.jsonl/.parquet file, a folder of them (searched recursively, sorted), or a prepared
    folder holding `meta.json` (the output of `menagerie prepare`). In a folder each .txt file is
    a document; a .txt file given alone is cut after line ends into about 100 documents, so that
    both splits get some. Rows whose text is not a string and binary files are skipped, and bytes
    that are not UTF-8 become U+FFFD; prepare reports the counts in one line."""

    task: SerializeAsAny[TaskConfig] | None = None
    """The synthetic task when `source` is "synthetic" (else null): `kind` picks it (mqar,
    linreg, path_star; see `data.synthetic`), the other keys are that task's fields."""

    text_field: str = "text"
    """The JSONL key / Parquet column that holds a document's text."""

    tokenizer: str = "byte"
    """"byte" (UTF-8 bytes + EOS, vocab 257), "bpe" (train a byte-level BPE of `bpe_vocab_size`
    on the training split with HF `tokenizers`), or a path to a `tokenizer.json`."""

    bpe_vocab_size: int = pydantic.Field(4096, ge=258)
    """Vocabulary size of the BPE trained when `tokenizer == "bpe"` (includes `<|eos|>`)."""

    val_fraction: float = pydantic.Field(0.05, ge=0.0, lt=1.0)
    """Fraction of documents held out for validation. The split is a pure function of the sha1 of
    each document's identifier, so adding files never moves other documents between splits."""

    cache_dir: str | None = None
    """Where automatically prepared data goes. None: $MENAGERIE_CACHE, else ~/.cache/menagerie.
    Its entries are rebuilt when found broken; leftovers of interrupted prepares are removed."""

    num_workers: int = pydantic.Field(0, ge=0)
    """Grain read threads that build windows for the iterator. 0: built in-process, in order."""

    prefetch: int = pydantic.Field(2, ge=0)
    """Batches prepared ahead of the trainer by a background thread. 0: no prefetch thread."""

    @pydantic.model_validator(mode="after")
    def _check_task(self) -> DataConfig:
        if self.source == SYNTHETIC and self.task is None:
            raise ValueError(
                "data.source='synthetic' needs data.task; choose one of: "
                f"{', '.join(sorted(TaskConfig.choices))} (e.g. data.task=mqar)"
            )
        if self.source != SYNTHETIC and self.task is not None:
            raise ValueError(
                f"data.task is set (kind {self.task.kind!r}) but data.source is "
                f"{self.source!r}; set data.source=synthetic, or data.task=null"
            )
        if self.source == SYNTHETIC and self.tokenizer != "byte":
            raise ValueError(
                f"data.tokenizer={self.tokenizer!r} does not apply to data.source='synthetic' "
                "(the task fixes the vocabulary); leave it unset"
            )
        return self

    @property
    def is_synthetic(self) -> bool:
        """Whether the data are a generated task (then `task` is set)."""
        return self.source == SYNTHETIC
