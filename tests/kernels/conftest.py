"""Kernel tests: the Pallas kernels in the interpreter on CPU (impl="interpret").

Set MENAGERIE_KERNEL_IMPL=pallas to run the same tests compiled on a GPU (bench/gpu_check.sh
does). Only jax, numpy, pytest and hypothesis are imported, so they run on a bare GPU host.
"""

import pytest
from kernel_testing import IMPL


@pytest.fixture
def impl():
    return IMPL
