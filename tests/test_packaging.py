"""What an installer sees: one version, the license, type information, the fallback warning."""

import importlib.metadata
import importlib.resources
import logging
import pathlib
import tomllib

import pytest
import torch

import sparse_prefill
from sparse_prefill.layout import KVCacheLayout
from sparse_prefill.ops.fp8_sparse_attn import gluon_kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_one_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["dynamic"] == ["version"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sparse_prefill._version.__version__"}
    assert sparse_prefill.__version__ == installed_metadata()["Version"]


def installed_metadata():
    """The installed distribution's metadata (``make`` installs it; a bare ``PYTHONPATH=.``
    checkout has none: skip)."""
    try:
        return importlib.metadata.metadata("sparse_prefill")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sparse_prefill is not installed (run from an installed environment)")


def test_license_and_typing_marker():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert (importlib.resources.files("sparse_prefill") / "py.typed").is_file()
    assert installed_metadata()["License"] == "MIT"


def test_gluon_fallback_warns_once_per_process(monkeypatch, caplog):
    """On an sm_90 GPU where a Gluon kernel cannot run (here: a Triton version it was not
    validated with) auto falls back to the Triton kernel and says so once per op, at warning
    level."""
    from sparse_prefill.ops.sparse_attn import gluon_kernel as attn_gluon

    monkeypatch.setattr(gluon_kernel, "unsupported_reason", lambda device, layout: None)
    monkeypatch.setattr(attn_gluon, "unsupported_reason", lambda device: None)
    monkeypatch.setattr(gluon_kernel, "VALIDATED_TRITON", ("0.0",))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gluon_kernel, "_WARNED", set())
    caches = (gluon_kernel.auto_picks_gluon, attn_gluon._auto_device_ok)
    for cache in caches:
        cache.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger=gluon_kernel.logger.name):
            for device in ("cuda:0", "cuda:1", "cuda:0"):
                assert not gluon_kernel.auto_picks_gluon(torch.device(device), KVCacheLayout.V4)
                assert not attn_gluon.auto_picks_gluon(torch.device(device), 64)
            assert not gluon_kernel.auto_picks_gluon(torch.device("cuda:0"), KVCacheLayout.V32)
    finally:
        for cache in caches:
            cache.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("falls back to its Triton kernel" in w for w in warnings)
    assert any("paged_fp8_sparse_attn_fwd" in w for w in warnings) and any("sparse_attn_fwd falls" in w for w in warnings)
    assert all("not one it was validated with" in w for w in warnings)
    # One debug line per (device, layout) of the FP8 op and per device of sparse_attn_fwd.
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 3 + 2
