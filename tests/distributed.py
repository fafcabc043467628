"""Run the trainer on several gloo processes the way a launcher would (env:// rendezvous)."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHDYNAMO_DISABLE="1",
    )
    from mone_train.preflight import compose_config
    from mone_train.trainer import run

    run(compose_config(overrides))


def run_processes(world_size: int, overrides: list[str], timeout_s: float = 240) -> None:
    """Train with ``world_size`` processes; raise if any of them fails."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, overrides))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout_s)
    codes = []
    for proc in procs:
        if proc.is_alive():
            proc.kill()
        codes.append(proc.exitcode)
    assert codes == [0] * world_size, f"exit codes {codes}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
