"""`menagerie export --verify`: the written folder, loaded by its format's own loader, against
the run, on the run's validation text.

Both sides run in float32 (a bfloat16 export is upcast on load, so what is measured is the
conversion and the rounding of the weights, not bf16 arithmetic) on the first `rows` windows of
the validation split, unshuffled (the windows `menagerie eval` reads first), cut to `max_len`
tokens; each window is one sequence on both sides (positions 0..T-1, no packed segments, which
the HF side does not have). Reported: max |logit difference|, mean KL(ours || export) per token
in nats, top-1 agreement. Tolerances (`TOLERANCE`): a float32 export must give max |difference|
<= 1e-3 (float32 matmuls summed in another order stay far below it, a misplaced weight far
above); a bfloat16 one, whose weights keep 8 bits of mantissa, mean KL <= 1e-2 nats/token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from menagerie.train.errors import MenagerieError

TOLERANCE = {"float32": ("max_abs_diff", 1e-3), "bfloat16": ("mean_kl", 1e-2)}


class ExportMismatch(MenagerieError):
    """The export's logits differ from the run's beyond `TOLERANCE`."""


@dataclass(frozen=True)
class Verification:
    """Ours vs the export on `tokens` validation tokens."""

    max_abs_diff: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    dtype: str

    @property
    def ok(self) -> bool:
        metric, tol = TOLERANCE[self.dtype]
        return getattr(self, metric) <= tol

    def line(self) -> str:
        metric, tol = TOLERANCE[self.dtype]
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"verify ({self.tokens} validation tokens, float32 both sides): max |logit diff| "
            f"{self.max_abs_diff:.2e}, KL {self.mean_kl:.2e} nats/token, top-1 agreement "
            f"{100 * self.top1_agreement:.2f}%; {verdict} ({metric} <= {tol:g} for a "
            f"{self.dtype} export)"
        )


def compare(ours_BTV: np.ndarray, theirs_BTV: np.ndarray, dtype: str) -> Verification:
    """The metrics of two logit arrays [B,T,V] of the same tokens."""
    ours = np.asarray(ours_BTV, np.float64)
    theirs = np.asarray(theirs_BTV, np.float64)
    if ours.shape != theirs.shape:
        raise ExportMismatch(f"the export gives logits of shape {theirs.shape}, ours {ours.shape}")
    logp, logq = _log_softmax(ours), _log_softmax(theirs)
    kl = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    return Verification(
        max_abs_diff=float(np.max(np.abs(ours - theirs))),
        mean_kl=float(np.mean(kl)),
        top1_agreement=float(np.mean(ours.argmax(-1) == theirs.argmax(-1))),
        tokens=int(ours.shape[0] * ours.shape[1]),
        dtype=dtype,
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def validation_tokens(run: Any, rows: int = 4, max_len: int = 512) -> np.ndarray:
    """[B,T] int32: the first `rows` unshuffled validation windows of the run, cut to max_len."""
    from menagerie.data import PackedDataset

    seq_len = run.cfg.train.seq_len
    ds = PackedDataset.from_config(run.cfg.data, "validation", seq_len)
    n = min(rows, ds.windows_per_epoch)
    windows = [ds.window(i, seed=0, shuffle=False)["tokens"] for i in range(n)]
    return np.stack(windows)[:, :max_len]


def float32_logits(run: Any, tokens_BT: np.ndarray) -> np.ndarray:
    """Our logits [B,T,V] of `tokens_BT` with the run's parameters in float32 and float32
    compute (whatever dtypes the run trained in)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from menagerie import arch

    m = run.cfg.model.model_copy(update={"param_dtype": "float32", "compute_dtype": "float32"})
    graphdef = nnx.split(nnx.eval_shape(lambda: arch.build(m, rngs=nnx.Rngs(0))))[0]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), run.params)
    model = nnx.merge(graphdef, params)
    forward = nnx.jit(lambda model, tokens: model(tokens).logits)
    return np.asarray(forward(model, jnp.asarray(tokens_BT, jnp.int32)))


def verify(run: Any, module: Any, out_dir, dtype: str) -> Verification:
    """Ours vs the export in `out_dir` written by format `module` (which has `reference_logits`)."""
    tokens = validation_tokens(run)
    theirs = module.reference_logits(out_dir)(tokens)
    return compare(float32_logits(run, tokens), theirs, dtype)
