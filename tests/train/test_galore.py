"""GaLore-family optimizers: parity with the official galore-torch and with optax.contrib.galore,
the successors' options, config errors, sharding names, and training with the trainer."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch  # the `test` extra pins it (see pyproject.toml)
from menagerie.train import lowrank
from menagerie.train.config import load_config
from menagerie.train.errors import ConfigError
from menagerie.train.lowrank import MatrixDims, apollo, galore, scale_by_lowrank
from menagerie.train.optim import make_optimizer, matrix_dims

from .conftest import TINY


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
    with jax.default_matmul_precision("highest"):
        yield


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


def test_galore_matches_official_galore_torch(monkeypatch):
    import galore_torch  # the official GaLoreAdamW (test extra)

    monkeypatch.setattr(torch.linalg, "svd", canonical_torch_svd(torch.linalg.svd))
    rank, gap, lr, wd, steps = 6, 3, 0.01, 0.05, 8  # refreshes at 0, 3, 6: 2+ full periods
    shapes = {"tall": (48, 24), "wide": (20, 56), "stack": (2, 40, 24), "vec": (24,)}
    rng = np.random.default_rng(0)
    params = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    # Official: one torch parameter per matrix; our stacked [2, m, n] has one projector per layer.
    tp = {k: torch.nn.Parameter(torch.tensor(params[k])) for k in ("tall", "wide", "vec")}
    tp.update({f"stack{i}": torch.nn.Parameter(torch.tensor(params["stack"][i])) for i in range(2)})
    low = [tp["tall"], tp["wide"], tp["stack0"], tp["stack1"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = galore_torch.GaLoreAdamW(
            [
                {
                    "params": low,
                    "rank": rank,
                    "update_proj_gap": gap,
                    "scale": 0.25,
                    "proj_type": "std",
                },
                {"params": [tp["vec"]]},
            ],
            lr=lr,
            weight_decay=wd,
        )
    dims = {"tall": MatrixDims(), "wide": MatrixDims(), "stack": MatrixDims(1, 1), "vec": None}
    tx = galore(lr, dims, rank=rank, update_proj_gap=gap, scale=0.25, weight_decay=wd)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    state, update = tx.init(jp), jax.jit(tx.update)
    for t, g in enumerate(spectral_grads(rng, shapes, steps)):
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
        for k in shapes:
            np.testing.assert_allclose(
                np.asarray(u[k]), ref[k], atol=1e-5, rtol=0, err_msg=f"{k} step {t}"
            )
            # And much tighter than the 1e-5 bar, relative to the update itself.
            assert np.abs(np.asarray(u[k]) - ref[k]).max() < 1e-3 * np.abs(ref[k]).max(), (k, t)
    # Projected moments really are low rank: [48, 24] tall -> right side, moments [48, r].
    assert state[0].mu["tall"].shape == (48, rank) and state[0].mu["wide"].shape == (rank, 56)
    assert state[0].mu["stack"].shape == (2, 40, rank)


def test_galore_matches_optax_contrib_on_the_same_side():
    assert hasattr(optax.contrib, "galore"), "optax>=0.2.7 ships optax.contrib.galore"
    rank, gap, lr, steps, eps = 5, 3, 0.02, 8, 1e-12
    shapes = {"tall": (40, 16), "wide": (12, 36), "attn": (16, 2, 12)}
    rng = np.random.default_rng(1)
    params = {k: jnp.asarray(0.1 * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    GDN = optax.contrib.GaLoreDimensionNumbers
    theirs = optax.contrib.galore(
        lr,
        rank=rank,
        update_proj_gap=gap,
        scale=0.25,
        base_optimizer=optax.scale_by_adam(b1=0.9, b2=0.999, eps=eps),
        weight_dimension_numbers={"tall": GDN(0, 1), "wide": GDN(0, 1), "attn": GDN(0, (1, 2))},
    )
    # optax.contrib projects the larger side = the official "reverse_std"; it keeps raw SVD
    # signs. Adam differs only in where eps sits (after vs before bias correction): with
    # eps = 1e-12 that is below float32 rounding.
    ours = galore(
        lr,
        {"tall": MatrixDims(), "wide": MatrixDims(), "attn": MatrixDims(0, 1)},
        rank=rank,
        update_proj_gap=gap,
        scale=0.25,
        eps=eps,
        side="reverse_std",
        canonical_signs=False,
        svd_method="default",
    )
    s_t, s_o = theirs.init(params), ours.init(params)
    p_t = p_o = params
    for t, g in enumerate(
        spectral_grads(rng, {"tall": (40, 16), "wide": (12, 36), "attn": (16, 24)}, steps)
    ):
        g = {k: jnp.asarray(v).reshape(shapes[k]) for k, v in g.items()}
        u_t, s_t = theirs.update(g, s_t, p_t)
        u_o, s_o = ours.update(g, s_o, p_o)
        p_t, p_o = optax.apply_updates(p_t, u_t), optax.apply_updates(p_o, u_o)
        for k in shapes:
            np.testing.assert_allclose(u_o[k], u_t[k], atol=1e-6, rtol=0, err_msg=f"{k} step {t}")
        assert int(s_o[0].count) == t + 1


def quadratic_run(tx, steps=30, shape=(4, 32, 24), seed=0):
    """Minimise ||A W - B||² for a stack of matrices; returns (first, last) loss and state."""
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((shape[0], 16, shape[1])), jnp.float32)
    target = jnp.asarray(rng.standard_normal((shape[0], 16, shape[2])), jnp.float32)
    params = {"w": jnp.zeros(shape, jnp.float32)}
    loss = lambda p: jnp.mean((a @ p["w"] - target) ** 2)
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        lval, g = jax.value_and_grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, lval

    losses = []
    for _ in range(steps):
        params, state, lval = step(params, state)
        losses.append(float(lval))
    return losses[0], losses[-1], state


STACK = {"w": MatrixDims(1, 1)}


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(stagger=True),
        dict(moments_on_refresh="reproject"),
        dict(fira=True, norm_growth_limit=1.01),
        dict(lazy_refresh=True, lazy_queue=2),
        dict(projection="random"),
        dict(svd_method="gram"),
    ],
    ids=["galore", "stagger", "reproject", "fira", "lazy", "random", "gram"],
)
def test_every_variant_descends(options):
    first, last, state = quadratic_run(
        galore(0.05, STACK, rank=4, update_proj_gap=5, scale=1.0, **options)
    )
    assert last < 0.7 * first, (options, first, last)
    assert state[0].mu["w"].shape == (4, 32, 4)  # [L, m, r]: 32x24 tall -> right side


def test_apollo_descends_and_stores_no_projector():
    first, last, state = quadratic_run(apollo(0.05, STACK, rank=4, update_proj_gap=5))
    assert last < 0.7 * first
    assert state[0].projector["w"].shape == ()  # regenerated from (seed, matrix, step)
    first_m, last_m, _ = quadratic_run(apollo(0.05, STACK, rank=1, scaling="tensor", scale=4.0))
    assert last_m < 0.7 * first_m


def test_stagger_refreshes_one_layer_at_a_time():
    tx = scale_by_lowrank(STACK, rank=3, update_proj_gap=4, stagger=True)
    params = {"w": jnp.zeros((4, 16, 12))}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    update = jax.jit(tx.update)
    changed = []
    for _ in range(9):
        g = {"w": jnp.asarray(rng.standard_normal((4, 16, 12)), jnp.float32)}
        old = state.projector["w"]
        _, state = update(g, state)
        changed.append(tuple(np.any(np.asarray(old != state.projector["w"]), axis=(1, 2))))
    # Step 0 initialises every layer; then layer i refreshes at steps = i (mod 4).
    assert changed[0] == (True,) * 4
    for step in range(1, 9):
        assert changed[step] == tuple(step % 4 == i for i in range(4)), (step, changed[step])


def test_lazy_refresh_doubles_the_gap_when_the_subspace_stops_moving():
    tx = scale_by_lowrank(
        {"w": MatrixDims()}, rank=2, update_proj_gap=2, lazy_refresh=True, lazy_queue=2
    )
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((12, 8)), jnp.float32)}
    state = tx.init({"w": jnp.zeros((12, 8))})
    for _ in range(8):  # constant gradient: cos = 1 at every refresh
        _, state = tx.update(g, state)
    assert int(state.gap["w"]) > 2


def test_reproject_rotates_moments_into_the_new_basis():
    # With a constant gradient the new basis equals the old one: moments must be unchanged
    # by the re-projection, so the run equals "keep".
    g = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((12, 8)), jnp.float32)}
    runs = []
    for mode in ("keep", "reproject"):
        tx = scale_by_lowrank(
            {"w": MatrixDims()}, rank=3, update_proj_gap=2, moments_on_refresh=mode
        )
        state = tx.init({"w": jnp.zeros((12, 8))})
        for _ in range(5):
            u, state = tx.update(g, state)
        runs.append(np.asarray(u["w"]))
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-6)


def test_fallback_to_full_rank_is_reported_once():
    lowrank._fallback_reported.clear()
    tx = galore(0.01, {"w": MatrixDims()}, rank=8)
    with pytest.warns(UserWarning, match=r"rank 8 >= min\(8, 6\) of 'w'; it gets full-rank Adam"):
        state = tx.init({"w": jnp.zeros((8, 6))})
    assert state[0].mu["w"].shape == (8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.update({"w": jnp.ones((8, 6))}, state, {"w": jnp.zeros((8, 6))})


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.update_proj_gap=0", "optim.update_proj_gap=0 must be >= 1"),
        ("optim.rank=-4", "optim.rank=-4 must be a positive integer"),
    ],
)
def test_bad_lowrank_config_is_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TINY, ["optim.name=galore", override])
    assert "\n" not in str(err.value)


def tiny_names():
    from flax import nnx
    from menagerie import arch
    from menagerie.train import mesh as mesh_lib

    cfg = load_config(TINY)
    model_cfg = cfg.model.with_vocab(256)
    abstract = nnx.eval_shape(lambda: arch.build(model_cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    return mesh_lib.logical_names(state), nnx.to_pure_dict(state)


def test_rank_on_a_non_matrix_is_a_config_error():
    names, _ = tiny_names()
    cfg = load_config(TINY, ["optim.name=galore", "optim.lowrank_params=[norm]"])
    with pytest.raises(ConfigError, match="is not a matrix") as err:
        make_optimizer(cfg.optim, 10, names)
    assert "\n" not in str(err.value)


def test_roles_and_state_names_follow_logical_axes():
    from menagerie.train.optim import opt_state_logical_names

    names, params = tiny_names()
    dims = matrix_dims(names)
    assert dims["blocks"]["mixer"]["q"]["kernel"] == MatrixDims(1, 1)  # [L, embed | heads, hd]
    assert dims["blocks"]["mixer"]["o"]["kernel"] == MatrixDims(1, 2)  # [L, heads, hd | embed]
    assert dims["embed"]["table"] is None and dims["blocks"]["ffn_norm"]["scale"] is None
    cfg = load_config(TINY, ["optim.name=galore", "optim.rank=8"])
    tx, _ = make_optimizer(cfg.optim, 10, names)
    state = jax.eval_shape(tx.init, params)
    sn = opt_state_logical_names(cfg.optim, state, params, names)
    # gate [L, 64, 256] -> std compresses embed (64): moments [L, r, 256] named like "mlp".
    assert state[0].mu["blocks"]["ffn"]["gate"]["kernel"].shape == (2, 8, 256)
    assert sn[0].mu["blocks"]["ffn"]["gate"]["kernel"] == ("layers", None, "mlp")
    assert sn[0].projector["blocks"]["ffn"]["gate"]["kernel"] == ("layers", "embed", None)
    assert sn[0].mu["embed"]["table"] == ("vocab", "embed")


def test_galore_trains_within_3_percent_of_adamw(tmp_path):
    from menagerie.train.trainer import Trainer

    common = [
        "train.steps=100",
        "train.eval_every=100",
        "train.eval_batches=4",
        "train.sample_tokens=0",
        "checkpoint.every=50",
        "log.tensorboard=false",
        "log.progress=false",
    ]
    adamw = Trainer(load_config(TINY, [f"run_dir={tmp_path / 'adamw'}", *common])).run()
    # The paper's GaLore hyperparameters (lr 0.01, alpha 0.25) at rank 16 = d_model / 4, as
    # 512 / 2048 at 1B; the AdamW baseline keeps the preset's tuned lr.
    galore_args = [
        "optim.name=galore",
        "optim.lr=0.01",
        "optim.rank=16",
        "optim.update_proj_gap=25",
        "optim.stagger_refresh=true",
    ]
    trainer = Trainer(load_config(TINY, [f"run_dir={tmp_path / 'galore'}", *common, *galore_args]))
    # GaLore is really active: every attention/MLP kernel has rank-16 moments (k, v: 64 x 32).
    state = jax.eval_shape(trainer.optimizer.init, trainer.abstract_state()["params"])
    for kernel in ("q", "k", "v", "o"):
        assert 16 in state[0].mu["blocks"]["mixer"][kernel]["kernel"].shape
    assert state[0].mu["blocks"]["ffn"]["up"]["kernel"].shape == (2, 16, 256)
    galore_summary = trainer.run()
    a, g = adamw.eval["loss"], galore_summary.eval["loss"]
    assert g <= 1.03 * a, (g, a)
    # The checkpointed low-rank state restores: a rerun resumes and goes on.
    more = load_config(
        TINY, [f"run_dir={tmp_path / 'galore'}", *common, *galore_args, "train.steps=110"]
    )
    assert np.isfinite(Trainer(more).run().eval["loss"])
