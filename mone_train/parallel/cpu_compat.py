"""Narrow patches that let megatron-core's MoE GPT train on a machine without CUDA.

megatron-core (pinned in ``pyproject.toml``) assumes a GPU in eight places that the MoE training
path reaches. Each patch below replaces exactly one of them with the CPU equivalent; nothing else
in megatron-core or torch changes. :func:`apply` installs them for a run on the CPU (by default:
when CUDA is absent) and is idempotent; :func:`restore` takes them out again (a CUDA run after a
CPU run in one process, as in the test suite on a GPU machine). Every patch has a test in ``tests/test_cpu_compat.py`` that exercises the megatron
code path which fails without it.

1. ``rng_tracker``: megatron's ``CudaRNGStatesTracker`` saves and restores *CUDA* generator
   states (``torch.cuda.get_rng_state``), which raises *Torch not compiled with CUDA enabled*.
   Attention always forks the model-parallel state and activation recompute snapshots all
   states, so we swap in a tracker with the same interface backed by the CPU generator.
2. ``current_device``: the router and rotary embeddings move tensors to
   ``torch.cuda.current_device()``; without CUDA that is the CPU.
3. ``streams``: the alltoall token dispatcher creates a ``torch.cuda.Stream`` for its
   device-to-host copies and records an event on it, and dist_checkpointing's writer calls
   ``torch.cuda.synchronize()`` after staging tensors to host memory. On CPU all of these are
   already synchronous, so no-op streams, events and synchronize keep the same control flow.
4. ``te_names``: ``moe_utils`` refers to ``te_general_gemm`` (and other TransformerEngine
   functions) that are only defined when TransformerEngine imports; we define them as ``None``,
   which is what megatron checks for when choosing its fallback.
5. ``alltoall_splits``: ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` converts only CUDA
   tensors, so on CPU the all-to-all split sizes stay tensors and
   ``torch.distributed.all_to_all_single`` rejects them (*incompatible function arguments*)
   whenever expert parallelism is > 1. We convert CPU tensors too when numpy is asked for.
6. ``schedule_tokens``: megatron's pipeline schedules count the loss's tokens in a tensor made
   with ``torch.zeros(..., device="cuda")`` (*Torch not compiled with CUDA enabled*). The
   schedules module sees a torch whose ``zeros`` puts a ``"cuda"`` request on the CPU; every
   other name is torch's own.
7. ``mla_te_stubs``: without TransformerEngine, megatron's TE extension module still imports
   (it stands in ``MagicMock`` objects for TE's classes), so ``multi_latent_attention`` believes
   TE is present and calls ``isinstance(self.linear_proj, TELinear)`` with a mock (*isinstance()
   arg 2 must be a type*) while building any MLA layer. We tell that module TE is absent, which
   only skips its TE-specific fp8/fp4 branch. This one is about TransformerEngine, not CUDA: a
   GPU run without TE installs it too (``ANY_DEVICE``).
8. ``embedding_copy``: with multi-token prediction (or tied embeddings) under pipeline
   parallelism the last stage holds a copy of the word embedding, which megatron starts equal to
   the first stage's by an all-reduce of ``weight.data.cuda()`` (*Torch not compiled with CUDA
   enabled*). We run megatron's set-up without that step, then the same all-reduce on the
   tensor where it is (none on the meta device, where there is nothing to copy).

With these, tensor and sequence parallelism need nothing more: megatron allocates their gather
buffers on ``torch.cuda.current_device()`` (patch 2) and its stage-to-stage sends synchronise
through ``torch.cuda.synchronize`` (patch 3).
"""

from __future__ import annotations

import contextlib

import torch

PATCHES = (
    "rng_tracker",
    "current_device",
    "streams",
    "te_names",
    "alltoall_splits",
    "schedule_tokens",
    "mla_te_stubs",
    "embedding_copy",
)

# Patches about TransformerEngine being absent, not CUDA: a GPU run without TE needs them too.
ANY_DEVICE = frozenset({"mla_te_stubs"})

_applied: set[str] = set()
_MISSING = object()
_originals: list[tuple[object, str, object]] = []  # (owner, attribute, value before the patch)


def _set(owner: object, name: str, value: object) -> None:
    """``setattr(owner, name, value)``, remembering the value it replaces for :func:`restore`."""
    _originals.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


def cuda_absent() -> bool:
    """True when this process has no usable CUDA device (the only case we patch)."""
    return not torch.cuda.is_available()


def applied_patches() -> frozenset[str]:
    """Names of the patches installed in this process."""
    return frozenset(_applied)


def apply(only: tuple[str, ...] | None = None, device: str | None = None) -> frozenset[str]:
    """Install the CPU patches (all, or the named subset) for a run on ``device`` ("cpu" patches,
    "cuda" only those in :data:`ANY_DEVICE`; None: "cpu" when CUDA is absent); return those
    active.

    Safe to call more than once. Must run before megatron-core builds a model or a dispatcher.
    """
    if device is None:
        device = "cpu" if cuda_absent() else "cuda"
    names = PATCHES if only is None else only
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown cpu_compat patch {sorted(unknown)}; valid: {list(PATCHES)}")
    if device != "cpu":  # on CUDA only what is about TransformerEngine's absence
        names = [name for name in names if name in ANY_DEVICE]
    for name in names:
        if name not in _applied:
            _INSTALLERS[name]()
            _applied.add(name)
    return applied_patches()


def restore() -> None:
    """Take every installed patch out again, newest first; megatron's RNG tracker is reset."""
    if not _originals:
        return
    from megatron.core.tensor_parallel import random as mp_random

    while _originals:
        owner, name, value = _originals.pop()
        if value is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    _applied.clear()
    mp_random.initialize_rng_tracker(force_reset=True)


# --- 1. RNG tracker ----------------------------------------------------------------------------


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    class CPURNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's RNG-states tracker, keeping named states of the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # initialize_rng_tracker() instantiates the class by its module-level name; the recompute
    # path (_get_all_rng_states / _set_all_rng_states) reads the "CUDA" state through these two.
    _set(mp_random, "CudaRNGStatesTracker", CPURNGStatesTracker)
    _set(mp_random, "_get_cuda_rng_state", get_rng_state)
    _set(mp_random, "_set_cuda_rng_state", set_rng_state)
    mp_random.initialize_rng_tracker(force_reset=True)


# --- 2. current device -------------------------------------------------------------------------


def _install_current_device() -> None:
    _set(torch.cuda, "current_device", lambda: "cpu")


# --- 3. streams and events ---------------------------------------------------------------------


class _CPUEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is already complete when recorded."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _CPUStream:
    """Stands in for ``torch.cuda.Stream``: CPU ops run in program order on one stream."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CPUEvent()

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, _CPUStream)

    def __hash__(self):
        return 0


_CPU_STREAM = _CPUStream()


def _install_streams() -> None:
    _set(torch.cuda, "Stream", _CPUStream)
    _set(torch.cuda, "Event", _CPUEvent)
    _set(torch.cuda, "current_stream", lambda device=None: _CPU_STREAM)
    _set(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext())
    _set(torch.cuda, "synchronize", lambda device=None: None)


# --- 4. TransformerEngine names ----------------------------------------------------------------


def _install_te_names() -> None:
    from megatron.core.transformer.moe import moe_utils

    for name in (
        "fused_compute_score_for_moe_aux_loss",
        "fused_moe_aux_loss",
        "fused_permute",
        "fused_permute_with_probs",
        "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs",
        "fused_topk_with_score_function",
        "fused_unpermute",
        "te_general_gemm",
    ):
        if not hasattr(moe_utils, name):
            _set(moe_utils, name, None)


# --- 5. all-to-all split sizes -----------------------------------------------------------------


def _install_alltoall_splits() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    _set(moe_utils, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
    _set(token_dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


# --- 6. the pipeline schedules' token counter ----------------------------------------------------


class _CPUZerosTorch:
    """torch, except that ``zeros(..., device="cuda")`` is made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


def _install_schedule_tokens() -> None:
    from megatron.core.pipeline_parallel import schedules

    _set(schedules, "torch", _CPUZerosTorch())


# --- 7. multi-latent attention's view of TransformerEngine ------------------------------------


def _install_mla_te_stubs() -> None:
    import importlib.util

    from megatron.core.transformer import multi_latent_attention

    if importlib.util.find_spec("transformer_engine") is None:
        _set(multi_latent_attention, "HAVE_TE", False)


# --- 8. the last stage's copy of the word embedding ----------------------------------------------


def _install_embedding_copy() -> None:
    import torch.distributed as dist
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self) -> None:
        in_embedding_group = self._is_in_embd_group
        self._is_in_embd_group = lambda: False  # megatron's all-reduce of a .cuda() copy
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        duplicated = self.share_embeddings_and_output_weights or getattr(
            self.config, "mtp_num_layers", 0
        )
        if not (duplicated and self.config.pipeline_model_parallel_size > 1):
            return
        if dist.is_initialized() and in_embedding_group():
            weight = self.shared_embedding_or_output_weight()
            if not weight.is_meta:
                dist.all_reduce(weight.data, group=self.embd_group)

    _set(LanguageModule, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)


_INSTALLERS = {
    "rng_tracker": _install_rng_tracker,
    "current_device": _install_current_device,
    "streams": _install_streams,
    "te_names": _install_te_names,
    "alltoall_splits": _install_alltoall_splits,
    "schedule_tokens": _install_schedule_tokens,
    "mla_te_stubs": _install_mla_te_stubs,
    "embedding_copy": _install_embedding_copy,
}
