"""menagerie.kernels: Pallas attention and sparse-FFN kernels, each beside its jnp reference.

Imports nothing but jax and numpy (the GPU check runs with no other package installed).
"""

from menagerie.kernels import masks
from menagerie.kernels.chunked_attention import (
    chunked_attention,
    chunked_attention_reference,
    chunked_attention_xla,
)
from menagerie.kernels.dispatch import IMPLS, KernelUnsupportedError, platform, resolve_impl
from menagerie.kernels.sparse_attention import (
    BlockSizes,
    sparse_attention,
    sparse_attention_reference,
)
from menagerie.kernels.sparse_ffn import sparse_ffn, sparse_ffn_gather, sparse_ffn_reference

__all__ = [
    "IMPLS",
    "BlockSizes",
    "KernelUnsupportedError",
    "chunked_attention",
    "chunked_attention_reference",
    "chunked_attention_xla",
    "masks",
    "platform",
    "resolve_impl",
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_ffn",
    "sparse_ffn_gather",
    "sparse_ffn_reference",
]
