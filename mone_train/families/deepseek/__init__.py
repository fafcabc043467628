"""DeepSeek-V3 style, with grouped-query attention instead of multi-head latent attention.

transformers' DeepseekV3ForCausalLM always uses MLA (a low-rank, RMSNorm-ed key/value path that
grouped-query attention cannot express), so these models are exported with our modeling code,
which has every part of the recipe (sigmoid router with the selection bias, group-limited
routing, scaling, shared expert, dense first layers).
"""

from __future__ import annotations

from mone_train.families.base import Family

FAMILY = Family("deepseek")
