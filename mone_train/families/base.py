"""What a family folder provides: its Hugging Face architecture and when a model fits it.

Every family shares one weight layout on the Hugging Face side (transformers' MoE classes all
keep a router ``mlp.gate`` and fused experts ``mlp.experts.gate_up_proj`` / ``down_proj``), so
the tensor mapping itself lives in ``mone_train/export/convert.py``; a family says

- which transformers class it maps to (``hf_class``; None: only our modeling code can hold it),
- why a given model cannot be written as that class (:meth:`Family.native_mismatch`: MoNE with
  K < F, an option the class lacks), in which case export falls back to our modeling code,
- how our settings become that class's config (:meth:`Family.hf_config_kwargs`), and back
  (:meth:`Family.model_overrides`, for import),
- how its checkpoints name what differs between families (the MoE block, the shared expert,
  the selection bias; :attr:`Family.moe_blocks` and the other ``hf_*`` attributes), which
  dense architectures it upcycles (:attr:`Family.dense_sources`), and what of a source's
  config it cannot reproduce (:meth:`Family.import_problem`): the importer names no family.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """An architecture family: its transformers class and the config translation both ways."""

    name: str
    hf_class: str | None = None  # e.g. "MixtralForCausalLM"; None: MoNE modeling code only
    hf_model_type: str | None = None  # transformers' model_type of hf_class
    free_head_dim: bool = False  # hf_class has a head_dim of its own (not hidden / heads)
    latent_attention: bool = False  # hf_class has multi-head latent attention (not GQA)
    # where a checkpoint's layer keeps its MoE block (the first found wins; Mixtral's
    # released checkpoints say block_sparse_moe, transformers' own classes mlp)
    moe_blocks: tuple[str, ...] = ("mlp.",)
    hf_shared_expert: str = "shared_expert."  # the shared expert's module in the MoE block
    hf_expert_bias: str | None = None  # the router's selection bias (None: the class has none)
    # dense model_types that import upcycled into this family -> the model.* they need
    dense_sources: dict = field(default_factory=dict)
    # the config's attention_bias puts a bias on the output projection (refused); False where a
    # family's config used the name for its q/k/v biases (Qwen2-MoE's)
    attention_bias_on_output: bool = True

    def is_dense(self, hf_config) -> bool:
        """A checkpoint of this class that is a dense model (one expert: softmax over one
        expert is 1), imported upcycled like one (override)."""
        return False

    def uses_sliding_window(self, hf_config) -> bool:
        """Whether the source's attention has a sliding window (override where the class
        names it otherwise)."""
        return bool(getattr(hf_config, "use_sliding_window", False))

    def import_problem(self, hf_config) -> str | None:
        """What of the source's config the import cannot reproduce, beyond the checks every
        family shares (override); None when nothing."""
        return None

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
        if (
            m.head_dim not in (None, m.hidden_size // m.num_attention_heads)
            and not self.free_head_dim
        ):
            return f"{self.hf_class} has no head size of its own"
        if m.multi_latent_attention and not self.latent_attention:
            return f"{self.hf_class} has no multi-head latent attention"
        if self.latent_attention and not m.multi_latent_attention:
            return f"{self.hf_class} has multi-head latent attention only"
        return self.router_mismatch(cfg) or self.family_mismatch(cfg)

    def router_mismatch(self, cfg) -> str | None:
        """Why the router is not the class's (override for a class with another router): most
        classes have a softmax router without bias, scaling or groups."""
        m = cfg.model
        if m.router_score != "softmax" or m.router_expert_bias or m.router_topk_scaling:
            return "the router is not a softmax router"
        if m.router_num_groups:
            return "group-limited routing"
        return None

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
