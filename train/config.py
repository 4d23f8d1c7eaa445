"""The run config: one typed `RunConfig` from defaults, a YAML preset and dotted overrides.

    cfg = load_config("configs/transformer/small.yaml", ["train.steps=200", "optim.lr=1e-3"])

Every section is a pydantic model with a default and a docstring per field; YAML presets state only
what differs from the defaults. Unknown keys are rejected with a did-you-mean, wrong types and
inconsistent values raise `ConfigError` with one line naming the key and the fix.
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml
from menagerie.arch import Choice, ModelConfig, TransformerConfig
from menagerie.arch.config import default_choice_keys, upgrade_model_dict
from menagerie.data import DataConfig
from pydantic import BaseModel, ConfigDict, SerializeAsAny, model_validator

from .errors import ConfigError
from .optim import AdamWConfig, OptimConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
"""The mesh's axes, outermost first (`train.mesh` builds it in this order)."""

_STRICT = ConfigDict(
    extra="forbid",
    use_attribute_docstrings=True,
    validate_assignment=True,
    allow_inf_nan=False,
    strict=True,
)


class TrainConfig(BaseModel):
    """The loop: steps, batch, evaluation, loss options and the closing sample."""

    model_config = _STRICT

    steps: int = 240
    """Number of optimizer steps."""
    batch_size: int = 8
    """Global batch size in sequences per optimizer step (all processes together)."""
    seq_len: int = 256
    """Tokens per sequence; documents are packed to this length."""
    microbatches: int = 1
    """Gradient accumulation: each step runs `microbatches` forward/backward passes of
    batch_size / microbatches sequences and applies one update."""
    seed: int = 0
    """Seeds parameter initialisation and data order. Same seed, same run."""
    z_loss: float = 0.0
    """Weight of the z-loss (mean of log(Z)^2 of the output softmax); 0 disables it."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (and at the end); 0 disables."""
    eval_batches: int = 4
    """Number of validation batches (of `batch_size` sequences) per evaluation."""
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    sample_tokens: int = 160
    """Tokens to generate at the end of training (0 disables the sample)."""
    sample_prompt: str = "def "
    """Prompt of the closing sample."""
    sample_temperature: float = 0.8
    """Sampling temperature of the closing sample (0 = greedy)."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        for name in ("steps", "batch_size", "seq_len", "microbatches", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be > 0")
        if self.batch_size % self.microbatches:
            raise ValueError(
                f"train.microbatches={self.microbatches} does not divide "
                f"train.batch_size={self.batch_size}; choose a divisor of the batch size"
            )
        if self.eval_every < 0 or self.eval_batches < 0 or self.sample_tokens < 0:
            raise ValueError(
                "train.eval_every, train.eval_batches and train.sample_tokens must be >= 0"
            )
        if self.z_loss < 0:
            raise ValueError(f"train.z_loss={self.z_loss} must be >= 0")
        if self.sample_temperature < 0:
            raise ValueError(
                f"train.sample_temperature={self.sample_temperature} must be >= 0 (0 = greedy)"
            )
        return self


class MeshConfig(BaseModel):
    """Device mesh axis sizes. Each mesh axis is `dcn_<axis>` x `<axis>` devices long: the outer
    factor spans DCN granules (TPU slices; elsewhere processes, one per node on a GPU cluster),
    the inner one the devices inside a granule (ICI / NVLink). So `dcn_data=4` puts data
    parallelism across 4 nodes while FSDP and tensor groups stay inside each. -1 on an inner
    axis means "all remaining devices of a granule" (at most one axis)."""

    model_config = _STRICT

    data: int = -1
    """Data parallelism: batch split, parameters replicated."""
    fsdp: int = 1
    """Fully sharded data parallelism: batch and parameters split."""
    tensor: int = 1
    """Tensor parallelism: heads and MLP width split."""
    sequence: int = 1
    """Sequence parallelism: the sequence axis of activations split (must divide
    train.seq_len)."""
    dcn_data: int = 1
    """Granules (slices or nodes) the data axis spans; 1 = none. The product of the dcn_* sizes
    must be the number of slices (TPU) or processes (GPU, CPU); on CPU with one process, that
    many equal blocks of simulated devices stand in for them."""
    dcn_fsdp: int = 1
    """Granules the fsdp axis spans (parameter all-gathers then cross the DCN); 1 = none."""
    dcn_tensor: int = 1
    """Granules the tensor axis spans; 1 = none (tensor parallelism wants the fast links)."""
    dcn_sequence: int = 1
    """Granules the sequence axis spans; 1 = none."""

    def inner(self) -> dict[str, int]:
        """axis -> size inside one granule (-1: fill)."""
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    def outer(self) -> dict[str, int]:
        """axis -> number of granules it spans."""
        return {axis: getattr(self, f"dcn_{axis}") for axis in MESH_AXES}

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        sizes = self.inner()
        if sum(1 for v in sizes.values() if v == -1) > 1:
            raise ValueError("only one mesh axis may be -1 (fill); set the others to sizes")
        bad = [k for k, v in sizes.items() if v == 0 or v < -1]
        if bad:
            raise ValueError(f"mesh.{bad[0]}={sizes[bad[0]]} must be a positive size or -1")
        bad = [k for k, v in self.outer().items() if v < 1]
        if bad:
            raise ValueError(
                f"mesh.dcn_{bad[0]}={getattr(self, f'dcn_{bad[0]}')} must be >= 1 "
                "(1 = the axis stays inside one slice or node)"
            )
        return self


class CheckpointConfig(BaseModel):
    """Orbax checkpointing of model + optimizer state and data position."""

    model_config = _STRICT

    every: int = 100
    """Save every this many steps (and at the end of training); 0 saves only at the end."""
    keep_last: int = 2
    """Keep the newest this many checkpoints."""
    keep_every: int | None = None
    """Also keep forever every checkpoint whose step is a multiple of this."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on."""

    @model_validator(mode="after")
    def _check(self) -> CheckpointConfig:
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 1")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ValueError("checkpoint.keep_every must be > 0, or null")
        return self


class LogConfig(BaseModel):
    """Where and how often metrics go."""

    model_config = _STRICT

    every: int = 10
    """Log training metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under `<run_dir>/tensorboard`."""
    progress: bool = True
    """Show a rich progress bar on a terminal."""

    @model_validator(mode="after")
    def _check(self) -> LogConfig:
        if self.every <= 0:
            raise ValueError(f"log.every={self.every} must be > 0")
        return self


class RunConfig(BaseModel):
    """Everything one training run needs. Saved, resolved, as `<run_dir>/config.yaml`."""

    model_config = _STRICT

    imports: list[str] = []
    """Python modules imported before the rest of the config is read, so that the parts,
    families and optimizers they define (by subclassing, see `arch.parts`) are selectable here;
    e.g. [my_lab.parts] for a module on PYTHONPATH."""
    run_dir: str = "runs/default"
    """Folder of this run: checkpoints, metrics, TensorBoard events and the resolved config.
    Rerunning with the same run_dir resumes from its latest checkpoint."""
    model: SerializeAsAny[ModelConfig] = TransformerConfig()
    """The model: `family` picks the architecture (transformer, ...), see `arch`."""
    data: DataConfig = DataConfig()
    optim: SerializeAsAny[OptimConfig] = AdamWConfig()
    """The optimizer: `name` picks it (adamw, galore, apollo), see `train.optim`."""
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_choice_keys(cls, data: Any) -> Any:
        return default_choice_keys(cls, data)

    @model_validator(mode="after")
    def _check_sequence(self) -> RunConfig:
        if self.mesh.sequence != -1:  # a filled axis is checked on the mesh (check_mesh_fits)
            _check_sequence_fits(self, self.mesh.sequence * self.mesh.dcn_sequence)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys: {', '.join(sorted(options))}"


def _check_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    """Reject unknown keys before pydantic does, so the message can suggest the right one.
    A choice section (model, model.mixer, optim, ...) is checked against the class its key
    selects."""
    fields = model.model_fields
    _check_moved(raw, model, prefix)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key '{dotted}'{_did_you_mean(key, list(fields))}")
        annotation = fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            continue
        if issubclass(annotation, Choice) and isinstance(value, str):
            value = {annotation.key: value}
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{dotted}' is a section; set its fields, e.g. {dotted}.<field>=<value>"
            )
        if issubclass(annotation, Choice) and annotation is annotation.slot():
            annotation = _chosen(annotation, value, fields[key].default, dotted)
        _check_keys(value, annotation, prefix=f"{dotted}.")


def _chosen(slot: type[Choice], raw: dict[str, Any], default: Any, dotted: str) -> type[Choice]:
    name = raw.get(slot.key, getattr(default, slot.key, None))
    try:
        return slot.choice_for(name)
    except ValueError:
        options = sorted(slot.choices)
        close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown {dotted}.{slot.key} {name!r}; {hint}choose one of: {', '.join(options)} "
            "(or add it to `imports:`)"
        ) from None


def _check_moved(raw: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
    moved = [
        k for k in raw if k in getattr(model, "moved_keys", {}) and k not in model.model_fields
    ]
    if moved:
        where = "; ".join(f"{prefix}{k} -> {prefix}{model.moved_keys[k]}" for k in moved)
        raise ConfigError(
            f"config keys moved into part sections: {where}; e.g. write "
            f"'{prefix}{model.moved_keys[moved[0]]}=...' or nest it in YAML"
        )


def _split_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(
            f"override '{item}' is not of the form key.sub=value (e.g. train.steps=200)"
        )
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override '{item}' has an empty key part; write e.g. optim.lr=1e-3")
    return path, text


def _annotation_at(raw: dict[str, Any], path: list[str]) -> Any:
    """The type of the field `path` names, following choice sections by their key in `raw`;
    None where the path leads nowhere (the key check reports that later)."""
    model, node = RunConfig, raw
    for i, key in enumerate(path):
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        if i == len(path) - 1:
            return annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        sub = node.get(key) if isinstance(node, dict) else None
        if issubclass(annotation, Choice) and annotation is annotation.slot():
            sub = {annotation.key: sub} if isinstance(sub, str) else sub
            try:
                annotation = _chosen(annotation, sub or {}, field.default, key)
            except ConfigError:
                return None
        model, node = annotation, sub if isinstance(sub, dict) else {}
    return None


def _is_text(annotation: Any) -> bool:
    """str, a Literal of strings, or either or None: a value the user types as plain text."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _is_text(rest[0])
    return False


def _parse_value(text: str, annotation: Any) -> Any:
    """An override's text as its field's type: plain text for string fields (no YAML: `#`,
    `yes` and `0123` stay as typed), YAML for numbers, booleans, lists and null."""
    if _is_text(annotation):
        nullable = type(None) in typing.get_args(annotation)
        return None if nullable and text.strip() in ("null", "~") else text
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        value = text  # YAML 1.1's yes/no/on/off: report what was typed, not a boolean
    # YAML 1.1 reads "1e-3" as a string; accept it as the float the user meant.
    if isinstance(value, str):
        try:
            value = float(value) if _looks_numeric(value) else value
        except ValueError:
            pass
    return value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text) and text.strip().lower() not in ("nan", "inf", "-inf")


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(err: pydantic.ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if not loc else f"{loc}: {msg}" if loc not in msg else msg
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc or 'config'}: {msg}{got_txt}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config path '{path}' is a folder; pass a YAML file such as "
            "configs/transformer/tiny.yaml"
        )
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist; "
            "pass a YAML file such as configs/transformer/tiny.yaml"
        )
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}' ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file '{path}' is not valid YAML{where}; fix its syntax"
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (model:, train:, ...)"
        )
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Validate a raw mapping plus dotted overrides into a `RunConfig`."""
    raw = _deep_copy(raw)
    split = [_split_override(item) for item in overrides]
    for path, text in split:  # first: modules that register parts the others may name
        if path == ["imports"]:
            _set_dotted(raw, path, _parse_value(text, list[str]))
    _import_modules(raw.get("imports") or [])
    for path, text in split:
        if path != ["imports"]:
            _set_dotted(raw, path, _parse_value(text, _annotation_at(raw, path)))
    _check_keys(raw, RunConfig)
    try:
        return RunConfig.model_validate(raw)
    except pydantic.ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML preset at `path` (optional) <- `overrides` ("a.b=value")."""
    raw = read_yaml(path) if path is not None else {}
    return build_config(raw, list(overrides))


def _import_modules(names: Any) -> None:
    """Import the `imports:` modules (they register their parts by defining them)."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"imports={names!r} must be a list of module names, e.g. [my_lab.parts]")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"imports: cannot import '{name}' ({e}); put its folder on PYTHONPATH"
            ) from None


def upgrade_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A run folder's saved config (possibly from an older menagerie) in today's shape: moved
    model keys put where they live now, and optimizer fields that belong to another optimizer
    (the old flat `optim:` section) or that are null for "default" dropped."""
    raw = dict(raw)
    if isinstance(raw.get("model"), dict):
        raw["model"] = upgrade_model_dict(raw["model"])
    optim = raw.get("optim")
    if isinstance(optim, dict):
        member = OptimConfig.choices.get(optim.get("name", "adamw"))
        if member is not None:
            raw["optim"] = {
                k: v
                for k, v in optim.items()
                if k in member.model_fields and not (v is None and k == "scale")
            }
    return raw


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def check_mesh_fits(cfg: RunConfig, data_parallel: int, sequence: int | None = None) -> None:
    """Batch sizes must split over the data-parallel devices (data x fsdp), and sequences over
    the `sequence` mesh axis (its size; None: as far as the config states it)."""
    per_micro = cfg.train.batch_size // cfg.train.microbatches
    if per_micro % data_parallel:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} / train.microbatches={cfg.train.microbatches}"
            f" = {per_micro} sequences per microbatch does not split over {data_parallel}"
            f" data-parallel devices; use a multiple of {data_parallel}"
        )
    if sequence is not None:
        try:
            _check_sequence_fits(cfg, sequence)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_sequence_fits(cfg: RunConfig, sequence: int) -> None:
    """ValueError unless the sequence mesh axis (`sequence` devices) divides train.seq_len:
    each device holds an equal block of every sequence, cut into the mixer's `sequence_chunks`
    (2 for the attention mixer's ring attention: its zigzag load balancing)."""
    seq_len = cfg.train.seq_len
    per_device = getattr(getattr(cfg.model, "mixer", None), "sequence_chunks", 1)
    ring = sequence > 1 and per_device > 1
    chunks = per_device * sequence if ring else sequence
    if seq_len % chunks:
        dcn = f" x mesh.dcn_sequence={cfg.mesh.dcn_sequence}" if cfg.mesh.dcn_sequence > 1 else ""
        up = -(-seq_len // chunks) * chunks
        need = f"{per_device} x {sequence} zigzag chunks of ring attention" if ring else "it"
        fits = seq_len // per_device if ring else seq_len
        raise ValueError(
            f"the sequence mesh axis (mesh.sequence={cfg.mesh.sequence}{dcn}: {sequence} devices)"
            f" does not divide train.seq_len={seq_len} into {need}; use a multiple of {chunks} "
            f"(e.g. train.seq_len={up}) or a mesh.sequence that divides {fits}"
        )


__all__ = [
    "RunConfig",
    "OptimConfig",
    "upgrade_saved",
    "TrainConfig",
    "MeshConfig",
    "CheckpointConfig",
    "LogConfig",
    "load_config",
    "build_config",
    "read_yaml",
    "check_mesh_fits",
]
