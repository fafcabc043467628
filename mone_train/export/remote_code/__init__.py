"""The Hugging Face modeling code of exported MoNE models (torch + transformers only).

``mone-export`` copies ``configuration_mone.py``, ``modeling_mone.py`` and
``mone_kernels/sparse_decode.py`` (as ``sparse_decode.py``) into the exported directory, where
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads them. Inside this
package the same classes serve in-memory conversion (``mone-generate`` on a run directory).
"""
