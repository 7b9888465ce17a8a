"""Shared pytest setup for the fourbit Python tests.

- Every test starts from the same global RNG state (seed 0), so failures reproduce.
- Tests marked ``@pytest.mark.cuda`` are skipped when no CUDA device is present (CI has
  none; they run on the GPU machine).
- The CPU matmul's kernel choice is pinned to the fixed rule (``FOURBIT_CPU_MATMUL=static``)
  unless the environment sets it: the tests' results then do not depend on timings taken on
  a shared CI machine, and no test writes the user's ~/.cache. Subprocesses inherit it.
  ``tests/python/test_cpu_dispatch.py`` tests the measured mode (``auto``) on its own.
"""

import os

import pytest
import torch

os.environ.setdefault("FOURBIT_CPU_MATMUL", "static")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
