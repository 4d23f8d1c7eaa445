"""The compiled kernels lower for GPU (Triton) and TPU (Mosaic) on a machine with neither.

The interpreter runs the kernel bodies but skips everything the real lowerings check: Triton's
power-of-two load/store shapes and supported ops, Mosaic TPU's block-shape and layout rules.
Cross-platform lowering (`.lower(lowering_platforms=...)`, with an abstract TPU device for the
Mosaic rules that ask which chip they target) runs those lowerings here, forward and backward,
at the benchmark shapes and at awkward ones. It stops before the backend compilers (ptxas,
libtpu), so shared-memory limits and Mosaic's own compiler checks still need the hardware.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from menagerie.kernels import BlockSizes, masks
from menagerie.kernels.sparse_attention import block_sparse_flash
from menagerie.kernels.tpu import splash_flash

RNG = np.random.default_rng(0)
SPARSE = masks.NumpyMask((RNG.random((300, 300)) < 0.2) | np.eye(300, dtype=bool)) & masks.Causal()


def lowered_text(platform, b, t, hq, hkv, dqk, dv, mask, blocks=None, segments=False):
    """StableHLO text of value_and_grad of the Pallas path, lowered for "cuda" or "tpu"."""
    q = jax.ShapeDtypeStruct((b, t, hq, dqk), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((b, t, hkv, dqk), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((b, t, hkv, dv), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, seg):
        if platform == "cuda":  # impl="pallas" off a TPU host is our GPU kernel
            o = block_sparse_flash(
                q,
                k,
                v,
                mask,
                scale=None,
                segment_ids=seg if segments else None,
                impl="pallas",
                block_sizes=blocks,
            )
        else:  # block_sparse_flash picks splash only on a TPU host: call it directly
            o = splash_flash(
                q,
                k,
                v,
                mask,
                scale=None,
                group=hq // hkv,
                interpret=False,
                segment_ids=(seg, seg) if segments else None,
            )
        return o.astype(jnp.float32).sum()

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    if platform == "cuda":
        return fn.trace(q, k, v, seg).lower(lowering_platforms=("cuda",)).as_text()
    device = jax.sharding.AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    ):
        return fn.trace(q, k, v, seg).lower(lowering_platforms=("tpu",)).as_text()


CASES = {
    # Llama d128 (GQA 4:1) with the default tiles: all 4 query heads per dK/dV program.
    "llama_d128": ((1, 8192, 32, 8, 128, 128), masks.Chunked(2048), BlockSizes.default(128, 128)),
    "llama_d128_split2": (
        (1, 2048, 8, 2, 128, 128),
        masks.Chunked(1024),
        BlockSizes(q=128, k=128, q_bwd=64, k_bwd=64, gqa_split=2),
    ),
    "megalodon": ((1, 1024, 2, 2, 256, 2048), masks.Chunked(512), None),  # several dv tiles
    # Ragged length, odd head dims (padded), a numpy mask, segments, GQA 6:2: a group of 3 query
    # heads summed in one dK/dV program, whose q / dO blocks are 3 heads wide (not a power of 2).
    "ragged_numpy_segments": ((2, 300, 6, 2, 48, 80), SPARSE, BlockSizes(gqa_split=1)),
    "strictly_causal": ((1, 200, 2, 2, 64, 64), masks.StrictlyCausal(), None),
    # GQA summed on chip with several dv tiles: a dV pass over dv tiles, then a dK pass.
    "gqa_dv_tiles": ((1, 512, 4, 2, 64, 256), masks.Causal(), BlockSizes(dv=64, gqa_split=1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernels_lower_to_triton(name):
    shape, mask, blocks = CASES[name]
    text = lowered_text("cuda", *shape, mask, blocks, segments=name.endswith("segments"))
    # forward, dQ and dK/dV (dV and dK separately when there are several dv tiles)
    n_calls = text.count("__gpu$xla.gpu.triton")
    assert n_calls == (4 if name in ("megalodon", "gqa_dv_tiles") else 3), n_calls
    dkdv = [line for line in text.splitlines() if 'name = "sparse_attention_dkdv"' in line]
    if name == "llama_d128":  # gqa_split 1 (auto): dK / dV come out per kv head, nothing to sum
        assert len(dkdv) == 1
        assert "-> (tensor<1x8192x8x128xbf16>, tensor<1x8192x8x128xbf16>)" in dkdv[0]
    if name == "ragged_numpy_segments":
        assert "-> (tensor<2x320x2x64xbf16>, tensor<2x320x2x128xbf16>)" in dkdv[0]
    if name == "llama_d128_split2":  # two partial sums per kv head
        assert "-> (tensor<1x2048x4x128xbf16>, tensor<1x2048x4x128xbf16>)" in dkdv[0]


@pytest.mark.parametrize("name", ["llama_d128", "megalodon", "ragged_numpy_segments"])
def test_tpu_kernels_lower_to_mosaic(name):
    shape, mask, _ = CASES[name]
    text = lowered_text("tpu", *shape, mask, segments=name.endswith("segments"))
    # Exactly three Mosaic kernels, each once: splash's forward (which saves the logsumexp
    # residuals) and its two backward kernels, dK/dV and dQ (the unfused backward that
    # kernels/tpu.py configures). One more would be a kernel run twice (a forward recomputed
    # in the backward); one fewer a backward fused into one kernel, or gradients that bypass
    # the kernels.
    assert text.count("tpu_custom_call") == 3, text.count("tpu_custom_call")
    kinds = re.findall(r'kernel_name = "splash_m[hq]a_(fwd|dkv|dq)_', text)
    assert sorted(kinds) == ["dkv", "dq", "fwd"], kinds


def _bench_kernels():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[2] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("megalodon", [False, True])
def test_every_tile_sweep_candidate_lowers_for_the_gpu(megalodon):
    # `bench/kernels.py --tune` spends scarce GPU minutes on these: a candidate that cannot
    # lower should fail here instead. Each list starts with the current default.
    bench = _bench_kernels()
    fwd, bwd = bench.tune_candidates(small=False, megalodon=megalodon)
    shape = (1, 2048, 4, 4, 256, 2048) if megalodon else (1, 2048, 8, 2, 128, 128)
    default = BlockSizes.default(shape[4], shape[5])
    assert BlockSizes(**{**fwd[0], **bwd[0]}) == default
    for f in fwd:
        for b in bwd if f is fwd[0] else bwd[:1]:
            lowered_text("cuda", *shape, masks.Chunked(1024), BlockSizes(**f, **b))
