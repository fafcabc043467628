"""Hugging Face MoE models from a local directory, with their routed experts hooked.

``transformers`` (5.x) stores the routed experts of Mixtral, Qwen2-MoE, OLMoE and many more as one
module per layer with fused weights, ``gate_up_proj [E, 2F, D]`` and ``down_proj [E, D, F]``, whose
eager forward loops over the experts that received tokens, in increasing expert order, and
computes ``act_fn(gate) * up`` for each. The model is loaded with that eager implementation
forced (``experts_implementation="eager"``), and each experts module gets:

- its ``act_fn`` replaced by :class:`ProbedActivation`, which applies the original activation,
  hands ``|g|`` to the recorder, and keeps the top-K ``|g|`` of each row (zeroing the rest);
- a forward pre-hook that reads the routing (``top_k_index``) and queues, in the order the eager
  loop visits them, which expert each activation call belongs to and how many rows it must have;
  every call is checked against that queue, so an implementation that computes experts some
  other way is reported instead of being silently mis-attributed.

Only the routed experts are touched. A shared expert (Qwen2-MoE's ``shared_expert``, a dense MLP
every token passes through) keeps all its neurons: the study is about the neurons of the
*activated routed* experts. Nothing is ever downloaded: the path must be a local directory and
every load passes ``local_files_only=True`` with the hub switched offline.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mone_train.analysis.errors import AnalysisError
from mone_train.analysis.neurons import NeuronControl, keep_top_neurons, kept_counts
from mone_train.errors import first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SEQ_LENGTH = 512
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _offline() -> None:
    """No network, whatever the environment says (read by huggingface_hub and transformers)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` looks like transformers' fused routed-experts module."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and hasattr(module, "act_fn")
    )


@dataclass
class _Routing:
    """(expert, rows) of the activation calls still expected in this layer's forward."""

    queue: deque


class ProbedActivation(nn.Module):
    """Stands in for an experts module's ``act_fn``: activation, record, keep the top K."""

    def __init__(
        self, act: nn.Module, layer: int, num_experts: int, num_neurons: int, control: NeuronControl
    ):
        super().__init__()
        self.act = act
        self.layer = layer
        self.num_experts = num_experts
        self.num_neurons = num_neurons
        self.control = control
        self.routing = _Routing(deque())

    def forward(self, gate_TF: torch.Tensor) -> torch.Tensor:
        if not self.routing.queue:
            raise AnalysisError(
                f"layer {self.layer}: the experts module computed an activation the routing does "
                "not account for (an experts implementation other than transformers' eager loop)"
            )
        expert, rows = self.routing.queue.popleft()
        if gate_TF.shape[0] != rows or gate_TF.shape[-1] != self.num_neurons:
            raise AnalysisError(
                f"layer {self.layer}: expert {expert} activation has shape {tuple(gate_TF.shape)}, "
                f"expected ({rows}, {self.num_neurons}) (unsupported experts implementation)"
            )
        g_TF = self.act(gate_TF)
        control = self.control
        if control.recorder is not None:
            control.recorder(self.layer, expert, g_TF.detach().abs())
        k = control.num_kept(self.num_neurons)
        if k is None:
            control.tally.add(rows, self.num_neurons, self.num_neurons)
            return g_TF
        g_TF, mask_TF = keep_top_neurons(g_TF, k)
        control.tally.add(rows, *kept_counts(mask_TF, rows, self.num_neurons))
        return g_TF


def _queue_routing(probe: ProbedActivation, num_experts: int):
    def pre_hook(module, args, kwargs):
        top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if not isinstance(top_k_index, torch.Tensor):
            raise AnalysisError(
                f"layer {probe.layer}: {type(module).__name__} was not called with the routing "
                "(top_k_index) as its second argument (unsupported experts module)"
            )
        counts = torch.bincount(top_k_index.reshape(-1), minlength=num_experts + 1)[:num_experts]
        probe.routing.queue = deque(
            (expert, int(counts[expert])) for expert in counts.nonzero().flatten().tolist()
        )

    def post_hook(module, args, output):
        if probe.routing.queue:
            expert, _ = probe.routing.queue[0]
            probe.routing.queue.clear()
            raise AnalysisError(
                f"layer {probe.layer}: expert {expert} received tokens but its activation was "
                f"never computed through {type(module).__name__}.act_fn (unsupported experts module)"
            )

    return pre_hook, post_hook


class HFModel:
    """A local Hugging Face causal LM whose routed experts are hooked by one NeuronControl."""

    kind = "huggingface"

    def __init__(self, path: Path, device: torch.device, dtype: str) -> None:
        _offline()
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # the studies show their own progress
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = path
        self.device = device
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as err:
            raise AnalysisError(
                f"--model {path}: config.json is not a transformers model config "
                f"({first_line(err)})"
            ) from None
        torch_dtype = DTYPES[dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                local_files_only=True,
                dtype=torch_dtype,
                experts_implementation="eager",
            )
        except Exception as err:
            raise AnalysisError(
                f"--model {path}: transformers cannot load it as a causal language model "
                f"({first_line(err)})"
            ) from None
        self.model = model.to(device).eval()
        self.config = config
        self.dtype = dtype
        self.control = NeuronControl()
        self.probes = self._hook_experts()
        self._tokenizer = None

    def _hook_experts(self) -> list[ProbedActivation]:
        found = [(name, m) for name, m in self.model.named_modules() if is_fused_experts(m)]
        if not found:
            raise AnalysisError(
                f"--model {self.path}: {type(self.model).__name__} has no MoE layers (no routed "
                "experts module with fused gate_up_proj [E, 2F, D] / down_proj [E, D, F]; dense "
                "models have no activated experts to study)"
            )
        probes = []
        for position, (name, module) in enumerate(found):
            num_experts, two_f, hidden = module.gate_up_proj.shape
            num_neurons = two_f // 2
            if (
                getattr(module, "is_transposed", False)
                or not getattr(module, "has_gate", True)
                or getattr(module, "has_bias", False)
                or tuple(module.down_proj.shape) != (num_experts, hidden, num_neurons)
            ):
                raise AnalysisError(
                    f"--model {self.path}: {name} ({type(module).__name__}) stores its experts in "
                    "a layout this tool does not read (supported: gated, concatenated "
                    "gate_up_proj [E, 2F, D], down_proj [E, D, F], no bias)"
                )
            match = _LAYER_INDEX.search(name)
            layer = int(match.group(1)) if match else position
            probe = ProbedActivation(module.act_fn, layer, num_experts, num_neurons, self.control)
            module.act_fn = probe
            pre_hook, post_hook = _queue_routing(probe, num_experts)
            module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            module.register_forward_hook(post_hook)
            probes.append(probe)
        implementation = getattr(self.model.config, "_experts_implementation", "eager")
        if implementation not in (None, "eager"):
            raise AnalysisError(
                f"--model {self.path}: transformers chose experts implementation "
                f"{implementation!r} and would not run the eager one this tool hooks"
            )
        return probes

    # -- what the studies read -----------------------------------------------------------------

    @property
    def moe_layers(self) -> dict[int, int]:
        """MoE decoder layer (0-based) -> its number of routed experts."""
        return {p.layer: p.num_experts for p in self.probes}

    @property
    def num_neurons(self) -> int:
        return self.probes[0].num_neurons

    @property
    def native_num_kept(self) -> int:
        """Neurons the model itself uses per (token, expert): all of them."""
        return self.num_neurons

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_seq_length(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @property
    def default_seq_length(self) -> int:
        return min(DEFAULT_SEQ_LENGTH, self.max_seq_length or DEFAULT_SEQ_LENGTH)

    def tokenize(self, text: str) -> np.ndarray:
        """Token ids of ``text`` by the tokenizer saved in the model directory (no specials)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.path), local_files_only=True
                )
            except Exception as err:
                raise AnalysisError(
                    f"--text needs the model's own tokenizer, but {self.path} has none that "
                    f"transformers can load ({first_line(err)}); use --data with tokenized data"
                ) from None
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def describe(self) -> dict:
        names = [name for name, _ in self.model.named_modules()]
        return {
            "kind": self.kind,
            "path": str(self.path),
            "class": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", None),
            "moe_layers": sorted(self.moe_layers),
            "num_experts": max(self.moe_layers.values()),
            "num_neurons": self.num_neurons,
            "router_topk": getattr(self.config, "num_experts_per_tok", None),
            "trained_keep_ratio": 1.0,
            "shared_experts": "not pruned" if any("shared_expert" in n for n in names) else None,
            "dtype": self.dtype,
        }

    @torch.no_grad()
    def loss_sum(self, batch_BW: np.ndarray) -> tuple[float, int]:
        """(sum of next-token cross-entropy in nats, number of predictions) for one batch."""
        tokens_BW = torch.from_numpy(batch_BW).to(self.device)
        inputs_BL, labels_BL = tokens_BW[:, :-1], tokens_BW[:, 1:]
        logits_BLV = self.model(input_ids=inputs_BL, use_cache=False).logits
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for logits_LV, labels_L in zip(logits_BLV, labels_BL):  # one row at a time: fp32 copy
            total += F.cross_entropy(logits_LV.float(), labels_L, reduction="sum").double()
        return float(total), labels_BL.numel()

    def close(self) -> None:
        """Nothing to tear down (kept for symmetry with our checkpoints)."""
