"""What a family folder provides: its Hugging Face architecture and when a model fits it.

Every family shares one weight layout on the Hugging Face side (transformers' MoE classes all
keep a router ``mlp.gate`` and fused experts ``mlp.experts.gate_up_proj`` / ``down_proj``), so
the tensor mapping itself lives in ``mone_train/export/convert.py``; a family says

- which transformers class it maps to (``hf_class``; None: only our modeling code can hold it),
- why a given model cannot be written as that class (:meth:`Family.native_mismatch`: MoNE with
  K < F, an option the class lacks), in which case export falls back to our modeling code,
- how our settings become that class's config (:meth:`Family.hf_config_kwargs`), and back
  (:meth:`Family.model_overrides`, for import).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """An architecture family: its transformers class and the config translation both ways."""

    name: str
    hf_class: str | None = None  # e.g. "MixtralForCausalLM"; None: MoNE modeling code only
    hf_model_type: str | None = None  # transformers' model_type of hf_class
    free_head_dim: bool = False  # hf_class has a head_dim of its own (not hidden / heads)

    def native_mismatch(self, cfg) -> str | None:
        """Why ``cfg`` (a mone-train Config) cannot be exported as ``hf_class`` exactly; None if
        it can. The checks every transformers MoE class shares come first."""
        if self.hf_class is None:
            return f"transformers has no class for the {self.name} family as trained here"
        m, moe = cfg.model, cfg.moe
        if moe.flavour == "mone" and moe.neuron_keep_ratio < 1:
            return "MoNE keeps K < F neurons per expert"
        if moe.neuron_bias_on():
            return "the neuron-level balance bias changes the neuron selection"
        if m.router_score != "softmax" or m.router_expert_bias or m.router_topk_scaling:
            return "the router is not a softmax router"
        if m.router_num_groups:
            return "group-limited routing"
        if (
            m.head_dim not in (None, m.hidden_size // m.num_attention_heads)
            and not self.free_head_dim
        ):
            return f"{self.hf_class} has no head size of its own"
        return self.family_mismatch(cfg)

    def family_mismatch(self, cfg) -> str | None:
        """The family's own conditions beyond the shared ones (override)."""
        return None

    def hf_config_kwargs(self, cfg) -> dict:
        """The family-specific fields of ``hf_class``'s config (override)."""
        raise NotImplementedError

    def model_overrides(self, hf_config) -> dict:
        """``model.*`` values that reproduce a ``hf_class`` config (override; for import)."""
        raise NotImplementedError


def dense_layers(cfg) -> list[int]:
    """Indices of the model's dense (non-MoE) layers."""
    return [i for i, moe in enumerate(cfg.model.moe_layer_pattern()) if not moe]


def require(condition: bool, reason: str) -> str | None:
    """``reason`` unless ``condition`` holds (for chaining mismatch checks)."""
    return None if condition else reason
