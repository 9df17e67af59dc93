"""Running a function on every rank of a fresh gloo process group (spawned processes)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
        import torch.multiprocessing  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


requires_gloo = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")

# A rank stuck in a collective (another rank raised) fails fast instead of after gloo's 30 minutes.
_TIMEOUT = timedelta(seconds=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Two CPU cores are shared by all ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_TIMEOUT)
    try:
        fn(rank, world, *args)
        # Rank 0 hosts the rendezvous store: no rank leaves while another may still need it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` spawned processes joined in one gloo group.

    ``fn`` must be a module-level function (spawn pickles it by name). An exception in any rank
    fails the caller with that rank's traceback; the other ranks are terminated.
    """
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
