"""DeepSeek-V3 as published: multi-head latent attention (megatron-core's ``MLASelfAttention``,
YaRN RoPE) with the routing recipe of the ``deepseek`` family (sigmoid scores with the
selection bias, group-limited top-k, scaling, a shared expert, dense first layers).

``arch=deepseek`` is the same routing recipe with grouped-query attention instead of MLA.
Export and import of transformers' ``DeepseekV3ForCausalLM`` are not wired yet (our modeling
code has no MLA), so this family has no Hugging Face class: export refuses it.
"""

from __future__ import annotations

from mone_train.families.base import Family

FAMILY = Family("deepseek_v3")
