"""menagerie.export: trained runs out of menagerie, and Hugging Face checkpoints in.

    menagerie export RUN_DIR [--step N] --format hf|megalodon|mosaics|torch --out DIR
                     [--dtype bfloat16] [--verify]
    menagerie import-hf MODEL_DIR [key.sub=value ...] --out RUN_DIR

`load_run(run_dir, step=None)` (`export.run`) returns a run's built model, tokenizer and config;
every format starts from it. A format is one module here with `FAMILIES` (the model families it
can write), `write(run, out_dir, dtype)`, optionally `check(model_cfg)` (refuses parts it cannot
express) and `reference_logits(out_dir)` (its own loader, for `--verify`); `FORMATS` maps the
`--format` name to it. `to_hf(run, out_dir)` is `export_run(run, "hf", out_dir)`;
`import_hf(model_dir, out)` (`export.hf_import`) makes a run folder of a Llama checkpoint.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from menagerie.train.errors import ConfigError, run_folder_io

FORMATS = {
    "hf": "menagerie.export.hf",
    "megalodon": "menagerie.export.megalodon",
    "mosaics": "menagerie.export.mosaics",
    "torch": "menagerie.export.pytorch",
}


def export_run(
    run: Any,
    fmt: str,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str = "float32",
    verify: bool = False,
    report=print,
) -> Path:
    """Write checkpoint `step` (default newest) of `run` (a run folder, or a `LoadedRun`) in
    format `fmt` into the new or empty folder `out`: written into a temporary sibling first and
    renamed, so a failed export leaves nothing behind and never touches an existing folder's
    files. `verify`: then load the folder with the format's own loader, `report` the
    comparison (`export.verify`) and raise ExportMismatch beyond its tolerance."""
    from .run import LoadedRun, load_run, run_config

    module = importlib.import_module(FORMATS[fmt])
    loaded = run if isinstance(run, LoadedRun) else None
    where = loaded.run_dir if loaded else run
    cfg = loaded.cfg if loaded else run_config(run)
    if cfg.model.family not in module.FAMILIES:
        raise ConfigError(
            f"--format {fmt} writes {', '.join(module.FAMILIES)} models; '{where}' holds a "
            f"{cfg.model.family} model"
        )
    if hasattr(module, "check"):
        module.check(cfg.model)
    if verify and not hasattr(module, "reference_logits"):
        raise ConfigError(
            f"--verify is not available for --format {fmt} yet (hf, torch and mosaics have it)"
        )
    if verify:
        module.verify_requirements()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out '{out}' exists and is not an empty folder; choose a new one")
    loaded = loaded or load_run(run, step)
    with run_folder_io("write the export", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a folder is not
            module.write(loaded, tmp, dtype)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if verify:
        from .verify import ExportMismatch
        from .verify import verify as compare_export

        result = compare_export(loaded, module, out, dtype)
        report(result.line())
        if not result.ok:
            raise ExportMismatch(f"the export in '{out}' differs from the run: {result.line()}")
    return out


def to_hf(run: Any, out_dir: str | Path, *, dtype: str = "float32", step: int | None = None):
    """A Hugging Face Llama folder of `run` (a run folder or a `LoadedRun`) in `out_dir`; see
    `export.hf`. Returns the folder."""
    return export_run(run, "hf", out_dir, step=step, dtype=dtype)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def __getattr__(name: str):
    # lazy: importing menagerie.export stays cheap
    if name in ("load_run", "LoadedRun"):
        from . import run

        return getattr(run, name)
    if name == "import_hf":
        from .hf_import import import_hf

        return import_hf
    raise AttributeError(name)


__all__ = ["FORMATS", "LoadedRun", "export_run", "import_hf", "load_run", "to_hf"]
