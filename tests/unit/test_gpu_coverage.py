"""The CUDA parity tests (which skip without a GPU) cover every variant the CPU parity tests
do: checked here, where CI runs, so a new CPU variant cannot be left out of them unseen."""

from __future__ import annotations

import pytest

from tests.gpu.test_cuda_parity import VARIANT_NAMES, variants

pytestmark = pytest.mark.unit


def test_the_cuda_tests_cover_every_cpu_parity_variant() -> None:
    assert sorted(VARIANT_NAMES) == sorted(variants())
    assert len(VARIANT_NAMES) == 11
