"""Config classes that are their own registry, and the model config every family extends.

A *choice* is a config slot with several implementations: the model family, each part of a
block (mixer, FFN, head), the optimizer. Its base class subclasses `Choice`; each implementation
subclasses that base and gives its key field (`family`, `kind`, `name`) a `Literal` default.
Defining the class registers it: a YAML mapping in that slot is validated as the subclass its key
names, so a part written in any file (even outside this package, see `RunConfig.imports`) is
selectable from YAML with no central list to edit. A bare string is shorthand for its key:
`ffn: swiglu` is `ffn: {kind: swiglu}`; a mapping without the key takes the slot's default.

`ModelConfig` is the `model:` slot: the fields every family shares (vocabulary, width, depth,
dtypes, remat, scanning) plus `with_vocab`, `num_params` and `flops_per_token`, which each family
computes by summing its parts.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict

DType = Literal["float32", "bfloat16"]


def check_positive(cfg: pydantic.BaseModel, prefix: str, ints=(), floats=()) -> None:
    """ValueError "prefix.name=value must be ..." for the first non-positive field named."""
    for name in ints:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"{prefix}{name}={value} must be a positive integer")
    for name in floats:
        value = getattr(cfg, name)
        if value is not None and not value > 0:
            raise ValueError(f"{prefix}{name}={value} must be positive")


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x."""
    return multiple * math.ceil(x / multiple)


class Config(pydantic.BaseModel):
    """Strict, frozen config: unknown keys, NaN and infinities, and values of another type (a
    boolean for an integer, a number for a string) are errors; each field has an attribute
    docstring; nested choice fields without their key take the default's key."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
        strict=True,
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_choice_keys(cls, data: Any) -> Any:
        return default_choice_keys(cls, data)


def default_choice_keys(cls: type[pydantic.BaseModel], data: Any) -> Any:
    """`data` with the key of every choice field given as a mapping without it filled from the
    field's default (`model: {d_model: 64}` keeps the default family)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name, field in cls.model_fields.items():
        default, value = field.default, data.get(name)
        if isinstance(default, Choice) and isinstance(value, dict) and default.key not in value:
            data[name] = {default.key: getattr(default, default.key), **value}
    return data


class Choice(Config):
    """Base of a choice slot. A slot base sets `choices = {}` and `key`; its subclasses register
    themselves under the `Literal` default of their key field."""

    key: ClassVar[str] = "kind"
    choices: ClassVar[dict[str, type[Choice]]]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get(cls.key)
        value = None if field is None else field.default
        if isinstance(value, str):
            registry = cls.slot().choices
            if value in registry and registry[value].__qualname__ != cls.__qualname__:
                raise TypeError(
                    f"{cls.slot().__name__} '{value}' is taken by {registry[value].__qualname__}"
                )
            registry[value] = cls

    @classmethod
    def slot(cls) -> type[Choice]:
        """The slot base class (the nearest class that declares `choices`)."""
        return next(c for c in cls.__mro__ if "choices" in c.__dict__)

    @classmethod
    def choice_for(cls, value: Any) -> type[Choice]:
        """The registered class a raw mapping (or key string) selects; ValueError if none."""
        name = value.get(cls.key) if isinstance(value, dict) else value
        registry = cls.slot().choices
        if name not in registry:
            known = ", ".join(sorted(registry))
            raise ValueError(f"unknown {cls.key} {name!r}; choose one of: {known}")
        return registry[name]

    @pydantic.model_validator(mode="wrap")
    @classmethod
    def _dispatch(cls, value: Any, handler: Any) -> Any:
        if cls is cls.slot() and isinstance(value, str | dict):
            raw = {cls.key: value} if isinstance(value, str) else value
            return cls.choice_for(raw).model_validate(raw)
        return handler(value)


class ModelConfig(Choice):
    """The `model:` section: what every family shares. Families subclass it (`family` key)."""

    key: ClassVar[str] = "family"
    choices: ClassVar[dict[str, type[Choice]]] = {}
    # Keys of older configs that a family moved; `train.config` turns them into one line.
    moved_keys: ClassVar[dict[str, str]] = {}

    family: str
    """Model family; `arch.build` builds the registered family of this name."""
    vocab_size: int | None = None
    """Rows of the embedding table. None: the tokenizer's size rounded up to `vocab_multiple`,
    filled in by `with_vocab(tokenizer_vocab)` before building."""
    vocab_multiple: int = 128
    """Multiple the resolved vocabulary is rounded up to (MXU/tensor-core tiles)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of blocks."""
    norm_eps: float = 1e-5
    """Epsilon of the RMS norms."""
    tie_embeddings: bool = True
    """Use the embedding table as the LM-head matrix (no separate head matrix)."""
    init_std: float = 0.02
    """Std of the normal init of all matrices."""
    param_dtype: DType = "float32"
    """dtype parameters are stored in."""
    compute_dtype: DType = "float32"
    """dtype of matmul inputs and activations. Norm statistics, softmax and logits are always
    float32."""
    remat: Literal["none", "full", "dots"] = "none"
    """Rematerialisation of each block in the backward pass: none (save all), full (save only
    the block input), dots (save matmul outputs without batch dims,
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable)."""
    scan_layers: bool = True
    """Stack blocks with nnx.scan (compile time independent of depth); False: a Python loop
    (easier to debug, per-layer params)."""

    @pydantic.model_validator(mode="after")
    def _check_sizes(self) -> ModelConfig:
        ints = ("vocab_size", "vocab_multiple", "d_model", "n_layers")
        check_positive(self, "model.", ints=ints, floats=("norm_eps", "init_std"))
        return self

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding table; raises if the vocabulary was not resolved yet."""
        if self.vocab_size is None:
            raise ValueError(
                "model.vocab_size is None; resolve it with cfg.with_vocab(tokenizer_vocab_size) "
                "before building or counting"
            )
        return self.vocab_size

    def with_vocab(self, tokenizer_vocab: int) -> ModelConfig:
        """Copy with `vocab_size` resolved for a tokenizer of `tokenizer_vocab` tokens.

        None becomes `tokenizer_vocab` rounded up to `vocab_multiple`; an explicit vocab_size
        smaller than the tokenizer is an error (token ids would index past the table).
        """
        if self.vocab_size is None:
            return self.model_copy(
                update={"vocab_size": round_up(tokenizer_vocab, self.vocab_multiple)}
            )
        if self.vocab_size < tokenizer_vocab:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                f"{tokenizer_vocab} tokens; raise it or leave it unset (null)"
            )
        return self

    # ---- what each family provides ----------------------------------------------------------

    def build(self, *, rngs: Any) -> Any:
        """The NNX model of this config (`arch.build` checks the vocabulary first)."""
        raise NotImplementedError(f"family {self.family!r} does not define build()")

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact number of parameters of the built model. Without embeddings, the
        vocabulary-sized matrices (embedding table, untied LM head) are left out: the
        "non-embedding" N of scaling laws."""
        raise NotImplementedError(f"family {self.family!r} does not define num_params()")

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context `seq_len`."""
        raise NotImplementedError(f"family {self.family!r} does not define flops_per_token()")

    def parts(self) -> tuple[Any, ...]:
        """The part configs of a block (a family without swappable parts has none)."""
        return ()

    def update_rules(self) -> dict[str, Any]:
        """{logical axis name: `parts.UpdateRule`} from the parts (`PartConfig.update_rules`)."""
        out: dict[str, Any] = {}
        for part in self.parts():
            out.update(part.update_rules(self))
        return out


def upgrade_model_dict(raw: dict[str, Any]) -> dict[str, Any]:
    """A `model:` mapping of an older menagerie with moved keys put where they live now (used to
    compare a run folder's saved config with today's; user YAML gets an error instead)."""
    family = ModelConfig.choices.get(raw.get("family", "transformer"))
    moved = {} if family is None else family.moved_keys
    out = {k: v for k, v in raw.items() if k not in moved}
    for old, new in moved.items():
        parent, leaf = new.split(".")
        if isinstance(out.get(parent), str):  # old `mixer: attention` -> {kind: attention}
            out[parent] = {"kind": out[parent]}
        if old in raw:
            out.setdefault(parent, {})[leaf] = raw[old]
    return out
