"""Test set-up: without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before sparse_prefill (and so triton.jit) is imported.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device kernels are tested on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, but reproducible from the test's id when it fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
