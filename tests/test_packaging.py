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
    """On an sm_90 GPU where the Gluon kernel cannot run (here: a Triton version it was not
    validated with) auto falls back to the Triton kernel and says so once, at warning level."""
    monkeypatch.setattr(gluon_kernel, "unsupported_reason", lambda device, layout: None)
    monkeypatch.setattr(gluon_kernel, "VALIDATED_TRITON", ("0.0",))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    picks = gluon_kernel.auto_picks_gluon
    already_warned = picks.__dict__.pop("warned", None)
    picks.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger=gluon_kernel.logger.name):
            for device in ("cuda:0", "cuda:1", "cuda:0"):
                assert not picks(torch.device(device), KVCacheLayout.V4)
            assert not picks(torch.device("cuda:0"), KVCacheLayout.V32)
    finally:
        picks.cache_clear()
        picks.__dict__.pop("warned", None)
        if already_warned is not None:
            picks.warned = already_warned
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falls back to its Triton kernel" in warnings[0].getMessage()
    assert "not one it was validated with" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 3  # one per (device, layout)
