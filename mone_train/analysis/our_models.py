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
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mone_train.analysis.errors import AnalysisError
from mone_train.analysis.neurons import NeuronControl, keep_top_neurons, kept_counts

MARKER = "COMPLETE.json"  # mone_train.checkpoint.MARKER, without importing megatron here


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint folder of ``path``: itself, or a run directory's newest complete one."""
    if (path / MARKER).is_file():
        return path
    folder = path / "checkpoints"
    if not folder.is_dir():
        raise AnalysisError(
            f"--model {path}: checkpoint folder without {MARKER} (a save was interrupted; "
            "expected a complete checkpoint or a run directory)"
        )
    latest = folder / "latest"
    if latest.is_file():
        named = folder / latest.read_text().strip()
        if (named / MARKER).is_file():
            return named
    complete = sorted(p for p in folder.glob("step_*") if (p / MARKER).is_file())
    if not complete:
        raise AnalysisError(
            f"--model {path}: run directory without a complete checkpoint (no "
            f"checkpoints/step_*/{MARKER}; train with trainer.save_interval > 0)"
        )
    return complete[-1]


def _config_from_marker(checkpoint: Path, marker: dict):
    """The run's Config from the saved resolved config.

    Only the sections that define the model and its evaluation are taken (model, moe, trainer,
    data.tokenizer); data, optimizer and logging settings do not matter here, so a checkpoint
    stays readable when those parts of the schema change.
    """
    from omegaconf import OmegaConf

    from mone_train.config import Config

    try:
        saved = marker["config"]
        wanted = {key: saved[key] for key in ("model", "moe", "trainer") if key in saved}
        tokenizer = (saved.get("data") or {}).get("tokenizer")
        if tokenizer is not None:
            wanted["data"] = {"tokenizer": tokenizer}
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), wanted))
    except Exception as err:
        raise AnalysisError(
            f"--model {checkpoint}: the config in {MARKER} does not fit this version's schema "
            f"({_first_line(err)})"
        ) from None


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

    def __call__(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        control = self.control
        k = control.num_kept(self.num_neurons)
        if control.recorder is None and (k is None or k == self.native_k):
            rows = permuted_local_hidden_states.shape[0]
            control.tally.add(rows, self.native_k, self.native_k)
            return self.own_forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        return self._forward(
            permuted_local_hidden_states,
            tokens_per_expert,
            permuted_probs,
            self.native_k if k is None else k,
        )

    def _forward(self, x_ND, tokens_per_expert, probs_N, k: int):
        """MoNEExperts' computation with K = ``k``: ([N, D] output, None)."""
        experts = self.experts
        if experts.num_local_experts == 1:
            counts = [x_ND.shape[0]]
        else:
            counts = tokens_per_expert.tolist()
        out_chunks = []
        for i, (expert, x_TD, probs_T) in enumerate(
            zip(experts.local_experts, torch.split(x_ND, counts), torch.split(probs_N, counts))
        ):
            fc1_T2F = expert.linear_fc1(x_TD)[0]
            gate_TF, up_TF = fc1_T2F.float().chunk(2, dim=-1)
            g_TF = F.silu(gate_TF)
            if self.control.recorder is not None:
                self.control.recorder(self.layer, self.first_expert + i, g_TF.abs())
            g_TF, mask_TF = keep_top_neurons(g_TF, k)
            rows = x_TD.shape[0]
            self.control.tally.add(rows, *kept_counts(mask_TF, rows, self.num_neurons))
            h_TF = (g_TF * up_TF).to(fc1_T2F.dtype)
            out_chunks.append(expert.linear_fc2((h_TF * probs_T.unsqueeze(-1)).to(h_TF.dtype))[0])
        out_ND = out_chunks[0] if len(out_chunks) == 1 else torch.cat(out_chunks, dim=0)
        return out_ND, None


class OurModel:
    """A mone-train checkpoint in this process, experts hooked by one NeuronControl."""

    kind = "mone-train"

    def __init__(self, path: Path, device: torch.device) -> None:
        self.checkpoint = resolve_checkpoint(path)
        try:
            marker = json.loads((self.checkpoint / MARKER).read_text())
        except (OSError, ValueError) as err:
            raise AnalysisError(f"--model {self.checkpoint}: unreadable {MARKER} ({err})") from None
        self.step = marker.get("step")
        cfg = _config_from_marker(self.checkpoint, marker)
        cfg.trainer.expert_parallel_size = 1  # one process; dist_checkpointing reshards
        self.cfg = cfg
        self._vocab_size = (marker.get("signature") or {}).get("vocab_size") or cfg.model.vocab_size
        self._tokenizer = None
        self._own_group = False
        self.control = NeuronControl()
        self.device = device
        self._start(device)

    def _start(self, device: torch.device) -> None:
        import torch.distributed as dist

        from mone_train.config import ConfigError
        from mone_train.distributed import init_distributed
        from mone_train.train import causal_mask, configure_torch

        configure_torch(self.cfg)
        self._own_group = not dist.is_initialized()
        try:
            info = init_distributed(1)
            if info.device.type != device.type:
                raise AnalysisError(
                    f"--device {device.type}: megatron-core runs this checkpoint on "
                    f"{info.device.type} here (hide GPUs with --device cpu)"
                )
            if self._vocab_size is None:
                self._vocab_size = self.tokenizer().vocab_size
            self.model = self._build_and_load()
        except ConfigError as err:  # tokenizer, launch environment
            self.close()
            raise AnalysisError(f"--model {self.checkpoint}: {err}") from None
        except BaseException:
            self.close()
            raise
        self._causal_mask = causal_mask
        self.hooks = self._hook_experts()

    def _build_and_load(self):
        from megatron.core import dist_checkpointing
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        from torch.distributed.checkpoint.api import CheckpointException

        from mone_train.model.builder import build_gpt_model

        torch.manual_seed(self.cfg.trainer.seed)
        model_parallel_cuda_manual_seed(self.cfg.trainer.seed)
        model = build_gpt_model(self.cfg, self._vocab_size)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        try:
            loaded = dist_checkpointing.load(
                {"model": model.sharded_state_dict()}, str(self.checkpoint)
            )
            missing, _ = model.load_state_dict(loaded["model"], strict=False)
        except (Exception, CheckpointException) as err:  # truncated files fail in many ways
            raise AnalysisError(
                f"--model {self.checkpoint}: the weights cannot be loaded ({_first_line(err)})"
            ) from None
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing:
            raise AnalysisError(
                f"--model {self.checkpoint}: the checkpoint lacks weights of this model "
                f"({missing[0]} and {len(missing) - 1} more)"
            )
        return model.eval()

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
            from mone_train.config import ConfigError
            from mone_train.data.tokenizer import tokenizer_from_config

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
        if self._own_group:
            from mone_train.distributed import shutdown_distributed

            shutdown_distributed()
            self._own_group = False
