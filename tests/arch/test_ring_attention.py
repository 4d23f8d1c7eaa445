"""Ring attention on 4 simulated devices equals single-device attention: outputs and gradients of
q, k and v, causal and not, with packed segments and GQA, on meshes that split only the
sequence or also the batch or the heads; the sequence really is split (the compiled program
passes blocks with collective-permutes and gathers nothing); and a length that the 2P zigzag
chunks do not divide is left to the compiler, with a warning.

The reference is `attention_ops.attention` without a mesh (`kernels.blocked_attention`, itself
checked against the dense definition in tests/kernels). One process, with XLA_FLAGS set before
JAX starts, runs this module as a script and writes JSON. As in
tests/train/test_megalodon_sequence_parallel.py, it runs without the persistent compilation
cache (XLA:CPU executables with collectives loaded from it can deadlock) and with most of XLA's
optimizations off (FAST_COMPILE_ENV); each program is compiled once, ahead of time, and the
comparison runs that executable.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tests.cli_testing import compiled_collectives, run_on_devices

B, T, H, K, D = 2, 32, 4, 2, 8  # P=4: chunks of C=4 tokens; P=2: of 8
# Row 0: three documents whose boundaries cut chunks and devices; row 1: one document.
SEGMENTS = [[0] * 5 + [1] * 20 + [2] * 7, [0] * T]
CASES = {  # name: (mesh sizes (data, fsdp, tensor, sequence), causal)
    "sequence4": ((1, 1, 1, 4), True),
    "sequence4_not_causal": ((1, 1, 1, 4), False),
    "data2_sequence2": ((2, 1, 1, 2), True),
    "tensor2_sequence2": ((1, 1, 2, 2), True),
}
# Measured (CPU, 2026-12-01, this code), largest |difference| over the cases: output 4.2e-7,
# dq 8.9e-7, dk 9.5e-7, dv 2.1e-6; the tolerance is about 5x the worst.
ATOL = 1e-5


def _case(mesh_shape, causal, q, k, v, seg, ct) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from menagerie.arch import attention_ops
    from menagerie.train.config import MeshConfig
    from menagerie.train.mesh import MESH_AXES, make_mesh

    def attend_and_grads(q, k, v, ct):
        attend = lambda q, k, v: attention_ops.attention(  # noqa: E731
            q, k, v, segment_ids_BT=seg, causal=causal
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(ct)

    want = jax.jit(attend_and_grads)(q, k, v, ct)
    mesh = make_mesh(MeshConfig(**dict(zip(MESH_AXES, mesh_shape, strict=True))))
    # Split like the model's activations: batch over data, positions over sequence, heads
    # over tensor.
    sharding = NamedSharding(mesh, P("data", "sequence", "tensor"))
    args = [jax.device_put(x, sharding) for x in (q, k, v, ct)]
    with jax.set_mesh(mesh):
        compiled = jax.jit(attend_and_grads).lower(*args).compile()
    got = compiled(*args)
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    diffs = [float(np.max(np.abs(g - w))) for g, w in pairs]
    return {"max_abs_diff": diffs, "collectives": compiled_collectives(compiled.as_text())}


def _traced_on_an_abstract_mesh(length: int) -> dict:
    """Whether attention over `length` tokens is traced as ring attention (a shard_map) under a
    sequence=4 mesh, and the warnings it gives (traced only, on an abstract mesh: nothing
    compiles)."""
    import warnings

    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh, AxisType
    from menagerie.arch import attention_ops
    from menagerie.train.mesh import MESH_AXES

    x = jax.ShapeDtypeStruct((1, length, 2, 4), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
    mesh = AbstractMesh((1, 1, 1, 4), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    attend = lambda x, s: attention_ops.attention(x, x, x, segment_ids_BT=s)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught, jax.sharding.use_abstract_mesh(mesh):
        warnings.simplefilter("always")
        jaxpr = str(jax.make_jaxpr(attend)(x, seg))
    return {"ring": "shard_map" in jaxpr, "warnings": [str(w.message) for w in caught]}


def main(out: str) -> None:
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    q, ct = (jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(SEGMENTS, jnp.int32)
    results = {name: _case(*case, q, k, v, seg, ct) for name, case in CASES.items()}
    results["traced"] = {t: _traced_on_an_abstract_mesh(t) for t in (16, 12)}
    Path(out).write_text(json.dumps(results))


def test_ring_attention_equals_single_device_attention(tmp_path):
    """Catches: blocks passed the wrong way round the ring, a diagonal block without its causal
    mask, segment ids not passed with their keys, the zigzag reorder not undone on the output
    (or done for some of q, k, v only), the wrong key half picked after the first step, and in
    the backward a dk/dv accumulator that misses its last hop home or a wrong delta (gradients
    differ); and ring attention silently not happening (the compiler gathers the sequence:
    an all-gather, and no collective-permutes)."""
    out = tmp_path / "results.json"
    run_on_devices("tests.arch.test_ring_attention", str(out), devices=4)
    r = json.loads(out.read_text())
    for name, (mesh_shape, _) in CASES.items():
        assert max(r[name]["max_abs_diff"]) < ATOL, (name, r[name]["max_abs_diff"])
        collectives = r[name]["collectives"]
        assert collectives["all-gather"] == collectives["all-to-all"] == [], (name, collectives)
        # Forward: k, v passed on P-1 times; backward: again, and dk, dv P times. None moves
        # more than one device's share of q (B T H D / P elements): no sequence is gathered.
        permutes = collectives["collective-permute"]
        assert len(permutes) >= 4 * (mesh_shape[-1] - 1), (name, permutes)
        assert max(math.prod(s) for s in permutes) <= B * T * H * D // mesh_shape[-1], name
    # 12 tokens do not cut into 8 zigzag chunks: the compiler's attention, with a warning.
    assert r["traced"]["16"] == {"ring": True, "warnings": []}
    assert not r["traced"]["12"]["ring"]
    (warned,) = r["traced"]["12"]["warnings"]
    assert "8 chunks, which do not divide 12 tokens" in warned


if __name__ == "__main__":
    main(sys.argv[1])
