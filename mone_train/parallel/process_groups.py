"""torch.distributed and megatron-core process groups for a run.

Launchers (torchrun, the deepspeed launcher, SLURM + torchrun) set RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without them the run is a single process. The run computes on the
device ``trainer.device`` names (:func:`choose_device`): the backend is then NCCL on GPUs and gloo
on CPU. megatron-core then forms the groups ("MoE parallel folding"): attention and
dense layers over tensor parallel TP x pipeline PP x data parallel DP = world / (TP x PP); experts
over expert parallel EP x PP x expert data parallel = world / (EP x PP), expert tensor parallel 1.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mone_train.config import DEVICES, layout_problem
from mone_train.errors import ConfigError, first_line
from mone_train.parallel import cpu_compat

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What ``trainer.device=auto`` means in this process when set (cpu | cuda): the test suite sets
# cpu, so a test computes on a GPU only where it names trainer.device=cuda.
DEVICE_ENV = "MONE_TRAIN_DEVICE"

_device_type: str | None = None  # the device of the run in this process (init_distributed)


class LaunchError(ConfigError):
    """The launch environment cannot form the job; the message names what is wrong."""


def launch_environment(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(rank, world size) from the launcher's variables, or None for a single process.

    Raises LaunchError naming the missing or malformed variables.
    """
    env = dict(os.environ if env is None else env)
    present = [name for name in RENDEZVOUS_VARS if name in env]
    if not present:
        return None
    missing = [name for name in RENDEZVOUS_VARS if name not in env]
    if missing:
        raise LaunchError(
            f"launch environment: {', '.join(missing)} not set (found {', '.join(present)}); "
            "torchrun, the deepspeed launcher and srun + torchrun set all of "
            f"{', '.join(RENDEZVOUS_VARS)}"
        )
    try:
        rank, world_size, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    except ValueError as err:
        raise LaunchError(
            f"launch environment: RANK, WORLD_SIZE and MASTER_PORT must be integers ({err})"
        ) from None
    if not (world_size >= 1 and 0 <= rank < world_size and 0 < port < 65536):
        raise LaunchError(
            f"launch environment: RANK={rank}, WORLD_SIZE={world_size}, MASTER_PORT={port} "
            "is invalid: expected 0 <= RANK < WORLD_SIZE and 0 < MASTER_PORT < 65536"
        )
    return rank, world_size


def choose_device(choice: str, cuda_available: bool, env_choice: str | None = None) -> str:
    """The device type a run computes on, ``"cuda"`` or ``"cpu"``.

    ``choice`` is ``trainer.device``: cpu or cuda as named; auto is ``env_choice`` (the value of
    MONE_TRAIN_DEVICE) when set, else cuda when a CUDA device is present. Raises ConfigError for
    an unknown value or cuda without a device.
    """
    if choice not in DEVICES:
        raise ConfigError(f"trainer.device={choice!r} is invalid: one of {list(DEVICES)}")
    where = "trainer.device"
    if choice == "auto" and env_choice:
        if env_choice not in ("cpu", "cuda"):
            raise ConfigError(f"{DEVICE_ENV}={env_choice!r} is invalid: cpu, cuda or unset")
        choice, where = env_choice, DEVICE_ENV
    if choice == "auto":
        return "cuda" if cuda_available else "cpu"
    if choice == "cuda" and not cuda_available:
        raise ConfigError(f"{where}=cuda is invalid here: no CUDA device (use auto or cpu)")
    return choice


def run_device(choice: str = "auto") -> str:
    """:func:`choose_device` on this machine, with this process's MONE_TRAIN_DEVICE."""
    return choose_device(choice, torch.cuda.is_available(), os.environ.get(DEVICE_ENV) or None)


def on_cuda() -> bool:
    """Whether the run in this process computes on CUDA (as :func:`init_distributed` chose).

    The one question for code that has neither the config nor the device at hand (RNG states
    in checkpoints, collective timing, where reduction buffers live); False before a run starts.
    """
    return _device_type == "cuda"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    device: torch.device
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def init_distributed(
    expert_parallel_size: int = 1,
    backend: str | None = None,
    timeout_s: float = 600.0,
    collective_timeout_s: float = 1800.0,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    device: str = "auto",
) -> DistInfo:
    """Start (or join) the process group and megatron-core's parallel state.

    A rank that cannot reach the master within ``timeout_s`` raises LaunchError instead of
    waiting for ever; a collective that takes longer than ``collective_timeout_s`` fails (the
    hang watchdog usually ends a stuck job sooner, with stack dumps: mone_train/components/watchdog.py).
    ``device`` is ``trainer.device`` (:func:`choose_device`): on the CPU, LOCAL_RANK picks no GPU
    and megatron-core's CUDA assumptions are patched (parallel/cpu_compat.py), with or without a
    GPU in the machine.
    """
    global _device_type
    device_type = run_device(device)
    cpu_compat.apply(device=device_type)
    use_cuda = device_type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    _device_type = device_type
    backend = backend or ("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        # The default group serves the rendezvous and the job-wide reductions: the longer one.
        timeout = timedelta(seconds=max(timeout_s, collective_timeout_s))
        layout = launch_environment()
        if layout is None:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        else:
            if layout[0] != 0:
                _wait_for_master(layout, timeout_s)
            try:
                store = _restart_store(layout, timeout)
                if store is None:
                    dist.init_process_group(backend, init_method="env://", timeout=timeout)
                else:
                    dist.init_process_group(
                        backend, store=store, rank=layout[0], world_size=layout[1], timeout=timeout
                    )
            except (RuntimeError, TimeoutError) as err:  # DistNetworkError, DistStoreError
                where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
                raise LaunchError(
                    f"rank {layout[0]} of {layout[1]}: could not form the process group with the "
                    f"master at {where} within {timeout_s:g} s ({first_line(err)})"
                ) from None
    world_size = dist.get_world_size()
    tp, pp, ep = tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
    problem = layout_problem(world_size, tp, pp, ep)
    if problem:
        raise ConfigError(problem)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            # Experts stay whole: a tensor-split expert would need a top-K across ranks.
            expert_tensor_parallel_size=1,
            distributed_timeout_minutes=collective_timeout_s / 60,
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_size=parallel_state.get_expert_model_parallel_world_size(),
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )


def _restart_store(layout: tuple[int, int], timeout: timedelta):
    """Under torchrun, the agent's store with this attempt's own key space; None otherwise.

    torchrun keeps its store across in-place restarts (``--max-restarts``), and the process
    groups name their keys alike in every attempt: a restarted worker would read the previous
    attempt's addresses and fail to connect (seen with gloo). ``TORCHELASTIC_RESTART_COUNT``
    separates the attempts.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), layout[1], is_master=False,
        timeout=timeout,
    )  # fmt: skip
    return dist.PrefixStore(f"/mone-train/attempt_{attempt}", agent_store)


def _wait_for_master(layout: tuple[int, int], timeout_s: float) -> None:
    """Block until the master's rendezvous port accepts connections, or raise LaunchError.

    Checked before torch.distributed connects, whose own time-out ends in C++ stack traces.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"rank {layout[0]} of {layout[1]}: could not reach the master at "
                    f"{addr}:{port} within {timeout_s:g} s ({err}); check MASTER_ADDR/MASTER_PORT "
                    "and that rank 0 started (trainer.init_timeout_s sets the wait)"
                ) from None
            time.sleep(0.5)


def shutdown_distributed() -> None:
    """Tear down megatron-core's groups and the process group (safe to call twice).

    Also forgets the auxiliary-loss gradient scale a training step set (a class attribute of
    megatron's): the next job in this process starts from megatron's default of 1.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    global _device_type
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    _device_type = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
