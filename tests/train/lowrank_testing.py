"""Shared by the low-rank optimizer tests: gradients with a clear spectrum, torch's SVD with our
sign convention, and a harness that feeds one gradient sequence to an official PyTorch optimizer
and to ours and compares the updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from menagerie.train.lowrank import MatrixDims


def spectral_grads(rng, shapes, steps):
    """Gradients with a decaying spectrum (rank-8 signal + noise), so the top-r singular
    vectors are well separated and every SVD implementation finds the same subspace."""
    out = []
    for _ in range(steps):
        g = {}
        for k, s in shapes.items():
            if len(s) >= 2:
                m, n = s[-2], s[-1]
                lead = s[:-2]
                a = rng.standard_normal((*lead, m, 8))
                b = rng.standard_normal((*lead, 8, n)) * (0.5 ** np.arange(8))[:, None]
                g[k] = (a @ b + 0.05 * rng.standard_normal(s)).astype(np.float32)
            else:
                g[k] = rng.standard_normal(s).astype(np.float32)
        out.append(g)
    return out


def canonical_torch_svd(orig):
    """torch.linalg.svd with our sign convention (largest-|entry| of each kept singular vector
    positive). Still a valid SVD, so the official code runs unchanged; without it MKL and
    jnp (OpenBLAS-style LAPACK) disagree on ~1/3 of the signs, and the official algorithm keeps
    moments across refreshes, so the trajectory depends on the LAPACK build."""

    def svd(a, full_matrices=True, **kw):
        u, s, vh = orig(a, full_matrices=full_matrices, **kw)
        m, n = a.shape[-2:]
        if m >= n:  # std keeps Vh rows
            sign = torch.sign(vh.gather(-1, vh.abs().argmax(-1)[..., None]))[..., 0]
        else:  # std keeps U columns
            sign = torch.sign(u.gather(-2, u.abs().argmax(-2)[..., None, :]))[..., 0, :]
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return u * sign[..., None, :], s, vh * sign[..., :, None]

    return svd


SHAPES = {"tall": (48, 24), "wide": (20, 56), "stack": (2, 40, 24), "vec": (24,)}
DIMS = {"tall": MatrixDims(), "wide": MatrixDims(), "stack": MatrixDims(1, 1), "vec": None}
# The projected torch parameters in our global matrix order (parameter paths sorted, then the
# stacked layers): APOLLO's random projector is a function of that index.
LOW = ("stack0", "stack1", "tall", "wide")


def random_params(seed):
    """(our float32 parameters over SHAPES, the official optimizers' torch parameters)."""
    rng = np.random.default_rng(seed)
    params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    return params, torch_params(params)


def torch_params(params):
    """One torch parameter per matrix: our stacked [2, m, n] is two official parameters."""
    tp = {k: torch.nn.Parameter(torch.tensor(params[k])) for k in ("tall", "wide", "vec")}
    for i in range(2):
        tp[f"stack{i}"] = torch.nn.Parameter(torch.tensor(params["stack"][i]))
    return tp


def run_both(opt, tp, tx, params, steps, seed, rtol):
    """Feeds the same gradients to both; asserts equal updates at every step, within `rtol` of
    the largest entry of the official update of each leaf (float32 rounding, and for SVD-based
    projectors the two LAPACKs' singular vectors). Returns (our final optimizer state, the
    largest such relative difference seen), so a test can print what it measured."""
    rng = np.random.default_rng(seed)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    state, update = tx.init(jp), jax.jit(tx.update)
    worst = 0.0
    for t, g in enumerate(spectral_grads(rng, SHAPES, steps)):
        before = {k: p.detach().clone() for k, p in tp.items()}
        for k in ("tall", "wide", "vec"):
            tp[k].grad = torch.tensor(g[k])
        for i in range(2):
            tp[f"stack{i}"].grad = torch.tensor(g["stack"][i])
        opt.step()
        u, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, jp)
        jp = optax.apply_updates(jp, u)
        ref = {k: (tp[k].detach() - before[k]).numpy() for k in ("tall", "wide", "vec")}
        ref["stack"] = np.stack(
            [(tp[f"stack{i}"].detach() - before[f"stack{i}"]).numpy() for i in range(2)]
        )
        for k in SHAPES:
            got = np.asarray(u[k])
            scale = np.abs(ref[k]).max()
            diff = np.abs(got - ref[k]).max() / scale
            worst = max(worst, diff)
            assert diff <= rtol, f"{k} step {t}: |ours - official| = {diff:.2e} x max |official|"
    return state, worst
