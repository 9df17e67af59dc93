"""Fixtures of the ops tests: what ``import flash_mla`` gives."""

from __future__ import annotations

import sys
import types

import pytest

from sparse_prefill.ops import flashmla_impl


def forget_flash_mla():
    flashmla_impl.flash_mla_module.cache_clear()
    flashmla_impl._device_reason.cache_clear()


@pytest.fixture
def flash_mla_as(monkeypatch):
    """A function making ``import flash_mla`` give a module for the rest of the test (None: the
    import raises ImportError); the cached answers are dropped both ways."""

    def install(module: types.ModuleType | None) -> None:
        monkeypatch.setitem(sys.modules, "flash_mla", module)
        forget_flash_mla()

    yield install
    forget_flash_mla()
