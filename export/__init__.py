"""menagerie.export: trained runs out of menagerie.

    menagerie export RUN_DIR [--step N] --format megalodon --out DIR [--dtype bfloat16]

`load_run(run_dir, step=None)` (`export.run`) returns a run's built model, tokenizer and config;
every format starts from it. A format is one module here with `FAMILIES` (the model families it
can write) and `write(run, out_dir, dtype)`; `FORMATS` maps the `--format` name to it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

from menagerie.train.errors import ConfigError, run_folder_io

FORMATS = {"megalodon": "menagerie.export.megalodon"}


def export_run(
    run_dir: str | Path, fmt: str, out: str | Path, *, step: int | None = None, dtype="float32"
) -> Path:
    """Write checkpoint `step` (default newest) of `run_dir` in format `fmt` into the new or
    empty folder `out`: written into a temporary sibling first and renamed, so a failed export
    leaves nothing behind and never touches an existing folder's files."""
    from .run import load_run, run_config

    module = importlib.import_module(FORMATS[fmt])
    family = run_config(run_dir).model.family
    if family not in module.FAMILIES:
        raise ConfigError(
            f"--format {fmt} writes {', '.join(module.FAMILIES)} models; '{run_dir}' holds a "
            f"{family} model"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out '{out}' exists and is not an empty folder; choose a new one")
    run = load_run(run_dir, step)
    with run_folder_io("write the export", out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a folder is not
            module.write(run, tmp, dtype)
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def __getattr__(name: str):
    if name == "load_run":  # lazy: importing menagerie.export stays cheap
        from .run import load_run

        return load_run
    raise AttributeError(name)


__all__ = ["FORMATS", "export_run", "load_run"]
