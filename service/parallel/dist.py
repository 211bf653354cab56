"""Start N local processes in one ``torch.distributed`` gloo group and collect what each returns.

Everything binds 127.0.0.1 on a free port; each rank gets a fixed number of intra-op threads (the benchmark
gives one core per process, which is what a rank would get on a real node: its own device). Results travel back
through ``torch.save`` files in a temporary folder, so tensors of any size return without a pipe's limits.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A rank failed, or the process group could not start (the message carries the rank's traceback)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    world: int,
    port: int,
    threads: int,
    timeout_seconds: float,
    fn: Callable[..., Any],
    args: tuple,
    out_dir: str,
) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no other interface is needed or wanted
    torch.set_num_threads(threads)
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world,
            timeout=_dt.timedelta(seconds=timeout_seconds),
        )
        try:
            result = {"ok": True, "value": fn(rank, world, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report every failure, with its traceback, to the parent
        result = {"ok": False, "error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def run_distributed(
    fn: Callable[..., Any],
    world: int = 2,
    args: tuple = (),
    threads_per_rank: int = 1,
    timeout_seconds: float = 300.0,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined in a gloo group.

    Args:
        fn: a module-level function (spawned processes import it by name).
        world: number of processes.
        args: extra arguments (tensors are passed through shared memory by ``torch.multiprocessing``).
        threads_per_rank: ``torch.set_num_threads`` in each rank.
        timeout_seconds: the process group's timeout for any one collective or send/recv.

    Returns:
        The value each rank returned, indexed by rank.

    Raises:
        DistributedError: when any rank raised (with its traceback) or exited without a result.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="loraserve-dist-") as out:
        try:
            mp.spawn(
                _entry,
                args=(world, port, threads_per_rank, timeout_seconds, fn, args, out),
                nprocs=world,
                join=True,
            )
        except mp.ProcessRaisedException as exc:  # pragma: no cover - _entry catches everything itself
            raise DistributedError(str(exc)) from exc
        except mp.ProcessExitedException as exc:
            raise DistributedError(f"a rank exited abnormally: {exc}") from exc
        results = []
        for rank in range(world):
            path = Path(out) / f"rank{rank}.pt"
            if not path.exists():
                raise DistributedError(f"rank {rank} left no result")
            r = torch.load(path, weights_only=False)
            if not r["ok"]:
                raise DistributedError(f"rank {rank} failed:\n{r['error']}")
            results.append(r["value"])
        return results


def _ping(rank: int, world: int) -> int:
    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    return int(t.item())


def gloo_available(world: int = 2, timeout_seconds: float = 60.0) -> tuple[bool, str]:
    """Whether a ``world``-process gloo group starts here and all-reduces; ``(False, reason)`` when not."""
    try:
        got = run_distributed(_ping, world, timeout_seconds=timeout_seconds)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"; the reason is returned
        return False, f"{type(exc).__name__}: {exc}"
    expected = world * (world + 1) // 2
    if got != [expected] * world:
        return False, f"all_reduce returned {got}, expected {expected} on every rank"
    return True, "ok"
