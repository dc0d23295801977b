"""The ``sglang`` export format: ``LlamaForCausalLMEagle3``, which SGLang and vLLM both load.

``config.json``: architectures ``["LlamaForCausalLMEagle3"]``, the Llama fields, ``draft_vocab_size``, the aux
layers in each engine's numbering (``engine_conventions.py``) and ``torch_dtype``; the weights file holds the
decoder layer under ``midlayer.*``.
"""

from __future__ import annotations

import torch

from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig
from tandem.speculative.export.engine_conventions import layer_config, sglang_aux_layer_ids, vllm_aux_layer_ids

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"


def export_config(config: Eagle3DraftConfig, dtype: torch.dtype, aux_layer_ids: list[int] | None = None) -> dict:
    """The ``config.json`` of the ``sglang`` format (``LlamaForCausalLMEagle3``)."""
    out = {"architectures": [EAGLE3_ARCHITECTURE], **layer_config(config, dtype),
           "draft_vocab_size": config.draft_vocab_size}
    if config.target_hidden_size != config.hidden_size:
        out["target_hidden_size"] = config.target_hidden_size
    if aux_layer_ids is not None:
        out["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": sglang_aux_layer_ids(aux_layer_ids),
                               "use_aux_hidden_state": True}
        out["eagle_aux_hidden_state_layer_ids"] = vllm_aux_layer_ids(aux_layer_ids)
    return out
