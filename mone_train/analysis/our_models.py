"""Our own checkpoints (plain MoE or MoNE), loaded for analysis in one process.

The model is rebuilt from the resolved config saved in the checkpoint's ``COMPLETE.json``
(megatron-core ``GPTModel``, expert parallel size 1: checkpoints reshard on load), and only its
weights are read back with ``dist_checkpointing`` (the optimizer moments stay on disk).

Every MoE layer's experts module (``MoNEExperts`` or megatron-core's ``SequentialMLP``) gets an
instance-level ``forward`` that consults the model's :class:`NeuronControl`:

- no keep ratio and no recorder, or a keep ratio whose K equals the module's own: the module's
  own forward runs, untouched (a plain-MoE checkpoint at p = 0, a MoNE checkpoint at
  p = 1 - rho, are exactly the trained model);
- otherwise the same computation as ``MoNEExperts.forward`` (fc1 per local expert, SwiGLU in
  fp32, router probabilities, fc2), with the top-K of ``|SiLU(gate)|`` per row as the study asks
  and ``|SiLU(gate)|`` handed to the recorder before any selection.

For a MoNE checkpoint the study's keep ratio *replaces* the trained one: p = 0 runs every
neuron (the dense expert the MoNE model never saw), p = 1 - rho reproduces training.

Legend: N dispatched rows on the experts module, E its local experts, T rows of one expert,
D hidden size, F neurons per expert, B batch, W window (sequence + 1), L sequence length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mone_train.analysis.errors import AnalysisError
from mone_train.analysis.neurons import NeuronControl, kept_counts
from mone_train.components.checkpoint import CheckpointError
from mone_train.components.checkpoint_model import (
    describe_checkpoint,
    open_checkpoint_model,
    saved_vocab_size,
)
from mone_train.data.tokenizer import tokenizer_from_config
from mone_train.errors import ConfigError
from mone_train.model.lm import causal_mask
from mone_train.model.mone_experts import experts_forward


class _ExpertsHook:
    """Instance ``forward`` of one experts module; see the module docstring."""

    def __init__(self, experts, layer: int, first_expert: int, control: NeuronControl):
        self.own_forward = experts.forward
        self.experts = experts
        self.layer = layer
        self.first_expert = first_expert
        self.control = control
        self.num_neurons = experts.config.moe_ffn_hidden_size
        self.native_k = getattr(experts, "num_kept", self.num_neurons)

    def __call__(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, probs_N: torch.Tensor
    ):
        control = self.control
        k = control.num_kept(self.num_neurons)
        if control.recorder is None and (k is None or k == self.native_k):
            control.tally.add(x_ND.shape[0], self.native_k, self.native_k)
            return self.own_forward(x_ND, tokens_per_expert_E, probs_N)
        return self._forward(x_ND, tokens_per_expert_E, probs_N, self.native_k if k is None else k)

    def _forward(self, x_ND, tokens_per_expert_E, probs_N, k: int):
        """MoNEExperts' computation with K = ``k``: ([N, D] output, None)."""
        recorder = self.control.recorder
        observer = None
        if recorder is not None:

            def observer(i: int, fc1_T2F: torch.Tensor) -> None:
                gate_TF = fc1_T2F[:, : self.num_neurons].float()
                recorder(self.layer, self.first_expert + i, F.silu(gate_TF).abs())

        out_ND, activations, counts = experts_forward(
            self.experts, x_ND, tokens_per_expert_E, probs_N, k, fc1_observer=observer
        )
        for act, rows in zip(activations, counts):
            self.control.tally.add(rows, *kept_counts(act.mask, rows, self.num_neurons))
        return out_ND, None


class OurModel:
    """A mone-train checkpoint in this process, experts hooked by one NeuronControl."""

    kind = "mone-train"

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            self.checkpoint, marker, self.cfg = describe_checkpoint(path, key="--model")
        except CheckpointError as err:
            raise AnalysisError(str(err)) from None
        self.step = marker.get("step")
        self._vocab_size = saved_vocab_size(marker, self.cfg)
        self._tokenizer = None
        self._opened = None
        self.control = NeuronControl()
        self.device = device
        try:
            if self._vocab_size is None:
                self._vocab_size = self.tokenizer().vocab_size
            self._opened = open_checkpoint_model(
                self.checkpoint, "--model", device=device.type, vocab_size=self._vocab_size
            )
        except ConfigError as err:  # tokenizer, launch environment, the weights
            raise AnalysisError(f"--model {self.checkpoint}: {err}") from None
        self.model = self._opened.model
        self._causal_mask = causal_mask
        try:
            self.hooks = self._hook_experts()
        except BaseException:
            self.close()
            raise

    def _hook_experts(self) -> list[_ExpertsHook]:
        from megatron.core.transformer.moe.moe_layer import MoELayer

        hooks = []
        for module in self.model.modules():
            if isinstance(module, MoELayer):
                experts = module.experts
                config = experts.config
                if config.add_bias_linear or not config.gated_linear_unit:
                    raise AnalysisError(
                        f"--model {self.checkpoint}: experts without a gated (SwiGLU) MLP or with "
                        "biases cannot be studied"
                    )
                hook = _ExpertsHook(
                    experts, module.layer_number - 1, module.local_expert_indices[0], self.control
                )
                experts.forward = hook
                hooks.append(hook)
        if not hooks:
            raise AnalysisError(f"--model {self.checkpoint}: the model has no MoE layers")
        return hooks

    # -- what the studies read -----------------------------------------------------------------

    @property
    def moe_layers(self) -> dict[int, int]:
        """MoE decoder layer (0-based) -> its number of routed experts."""
        return {h.layer: self.cfg.model.num_experts for h in self.hooks}

    @property
    def num_neurons(self) -> int:
        return self.cfg.model.moe_ffn_hidden_size

    @property
    def native_num_kept(self) -> int:
        """Neurons the trained model keeps per (token, expert): K of rho, or all (plain MoE)."""
        return self.hooks[0].native_k

    @property
    def trained_keep_ratio(self) -> float:
        return self.cfg.moe.neuron_keep_ratio if self.cfg.moe.flavour == "mone" else 1.0

    @property
    def vocab_size(self) -> int:
        return int(self._vocab_size)

    @property
    def max_seq_length(self) -> int:
        return self.cfg.model.max_position_embeddings

    @property
    def default_seq_length(self) -> int:
        return self.cfg.trainer.seq_length

    def tokenizer(self):
        """The tokenizer of the run's config (bytes for runs older than ``data.tokenizer``)."""
        if self._tokenizer is None:
            try:
                self._tokenizer = tokenizer_from_config(getattr(self.cfg.data, "tokenizer", None))
            except ConfigError as err:
                raise AnalysisError(f"--model {self.checkpoint}: {err}") from None
        return self._tokenizer

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer().tokenize(text), dtype=np.int64)

    def describe(self) -> dict:
        m = self.cfg.model
        return {
            "kind": self.kind,
            "path": str(self.checkpoint),
            "step": self.step,
            "flavour": self.cfg.moe.flavour,
            "moe_layers": sorted(self.moe_layers),
            "num_experts": m.num_experts,
            "num_neurons": m.moe_ffn_hidden_size,
            "router_topk": m.router_topk,
            "trained_keep_ratio": self.trained_keep_ratio,
            "trained_num_kept": self.native_num_kept,
            "shared_experts": None,
            "dtype": "float32",
        }

    @torch.no_grad()
    def loss_sum(self, batch_BW: np.ndarray) -> tuple[float, int]:
        """(sum of next-token cross-entropy in nats, number of predictions) for one batch."""
        tokens_BW = torch.from_numpy(batch_BW).to(self.device)
        inputs_BL, labels_BL = tokens_BW[:, :-1], tokens_BW[:, 1:]
        batch, length = inputs_BL.shape
        position_ids = torch.arange(length, device=self.device).expand(batch, length)
        mask = self._causal_mask(length, self.device)
        per_token_BL = self.model(inputs_BL, position_ids, mask, labels=labels_BL)
        return float(per_token_BL.double().sum()), labels_BL.numel()

    def close(self) -> None:
        """Tear down the process group if this object started it."""
        if self._opened is not None:
            self._opened.close()
