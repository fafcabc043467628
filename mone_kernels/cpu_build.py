"""Build, cache and load the C++ CPU operators (``csrc/``), safely for any number of processes.

The library is compiled once per machine with torch's C++ extension toolchain (a C++ compiler
and ninja; about 15 s) into ``$TORCH_EXTENSIONS_DIR/mone_cpu_kernels-<digest>/`` (default
``~/.cache/torch_extensions``), where the digest covers every source and header, the compiler
flags and the torch and Python versions. ``scripts/install.sh`` builds it ahead of time
(``python -m mone_kernels.cpu_build``), so training processes normally only load it.

Loading a built library takes no lock. Building takes an ``fcntl`` lock on a file beside it,
which the operating system releases when its holder dies (torch's own loader uses a lock file
that a process killed at the wrong moment leaves behind, after which every later process waits
for it forever). The build runs in a private folder and the library is moved into place
atomically, so a reader sees a whole library or none. A process that waits for another's build
says so once and gives up after ``MONE_KERNEL_BUILD_TIMEOUT_S`` (default 600) seconds.

The row loops are compiled for AVX-512, AVX2 and the x86-64 baseline in the same library and
picked at run time (``csrc/cpu_isa.h``): ``MONE_CPU_ISA=avx512|avx2|baseline`` (or torch's
``ATEN_CPU_CAPABILITY``) caps the choice, :func:`set_cpu_isa` changes it in a process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / name for name in ("topk_swiglu_cpu.cpp", "rms_norm_cpu.cpp", "rope_cpu.cpp")]
HEADERS = [CSRC / "cpu_isa.h"]
EXTENSION_NAME = "mone_cpu_kernels"
# -ffp-contract=off keeps every product and sum separately rounded, as torch's kernels are (the
# RoPE results are megatron's bit for bit, and the three instruction sets give the same bits).
# -fno-trapping-math promises that no code here watches floating-point exceptions, which lets
# GCC vectorise the clamps of the backward's sigmoid for AVX2 (AVX-512 masks needed no promise);
# it changes no result.
CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
ISAS = ("avx512", "avx2", "baseline")
BUILD_TIMEOUT_S = 600.0  # a cold build takes ~15 s on 2 cores; 40x that is a stuck builder

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where this build of the library lives (the digest names the sources, flags, versions)."""
    digest = hashlib.sha256()
    for path in [*SOURCES, *HEADERS]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, sys.version, sys.platform):
        digest.update(part.encode() + b"\0")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"{EXTENSION_NAME}-{digest.hexdigest()[:16]}"


def library_path() -> Path:
    return cache_dir() / f"{EXTENSION_NAME}.so"


def _environment_error() -> str | None:
    value = os.environ.get("MONE_CPU_ISA")
    if value and value not in ISAS:
        return f"MONE_CPU_ISA={value} is invalid: expected one of {', '.join(ISAS)}"
    return None


def _timeout_s() -> float:
    value = os.environ.get("MONE_KERNEL_BUILD_TIMEOUT_S")
    try:
        return float(value) if value else BUILD_TIMEOUT_S
    except ValueError:
        return BUILD_TIMEOUT_S


def _wait_for_lock(handle, lock_path: Path) -> None:
    """Take the build lock, waiting at most the timeout (one message if it is not free)."""
    deadline = time.monotonic() + _timeout_s()
    told = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"another process has held {lock_path} for over {_timeout_s():.0f} s"
                ) from None
            if not told:
                log.warning("waiting for another process to build the CPU kernels (%s)", lock_path)
                told = True
            time.sleep(0.2)


def _compile_into(target: Path) -> None:
    """Compile the library in a private folder beside ``target`` and move it into place."""
    from torch.utils.cpp_extension import load

    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        load(
            name=EXTENSION_NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(CFLAGS),  # copies: the loader appends to them
            extra_ldflags=list(LDFLAGS),
            build_directory=str(scratch),
            is_python_module=False,
            verbose=False,
        )
        os.replace(scratch / f"{EXTENSION_NAME}.so", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build() -> Path:
    """The built library's path, compiling it first if this machine has none (locked)."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / "build.lock"
    with open(lock_path, "a") as handle:
        _wait_for_lock(handle, lock_path)
        for leftover in target.parent.glob(".build-*"):  # of a builder that died: ours now
            shutil.rmtree(leftover, ignore_errors=True)
        if not target.exists():
            start = time.perf_counter()
            _compile_into(target)
            log.info("built the CPU kernels in %.1f s: %s", time.perf_counter() - start, target)
    return target


@functools.cache
def load_error() -> str | None:
    """Load the operators into this process once (building them if needed); None when they
    are usable, else why not in one line."""
    error = _environment_error()
    if error is not None:
        return error
    try:
        torch.ops.load_library(str(build()))
    except Exception as err:  # no compiler, no ninja, a failed build, a stuck builder
        message = str(err).strip().splitlines()
        return f"{type(err).__name__}: {message[-1] if message else ''}"
    return None


def cpu_isa() -> str:
    """The instruction set the operators' row loops use now: avx512, avx2 or baseline."""
    return torch.ops.mone_cpu.isa()


def set_cpu_isa(name: str) -> str:
    """Use ``name`` (or the best the CPU has below it) from now on; returns the one in use."""
    if name not in ISAS:
        raise ValueError(f"instruction set {name!r} is invalid: expected one of {', '.join(ISAS)}")
    return torch.ops.mone_cpu.set_isa(name)


@contextlib.contextmanager
def using_isa(name: str):
    """Run the operators with ``name`` (capped by the CPU) inside the block; yields the set used."""
    previous = cpu_isa()
    try:
        yield set_cpu_isa(name)
    finally:
        set_cpu_isa(previous)


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, best first."""
    current = cpu_isa()
    try:
        available = {set_cpu_isa(name) for name in ISAS}
    finally:
        set_cpu_isa(current)
    return [name for name in ISAS if name in available]


def main() -> None:
    """``python -m mone_kernels.cpu_build``: build ahead of time (install does this)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    error = load_error()
    if error is not None:
        print(f"mone-kernels: the CPU operators could not be built: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"CPU operators ready: {library_path()} (instruction set {cpu_isa()})")


if __name__ == "__main__":
    main()
