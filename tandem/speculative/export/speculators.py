"""The ``speculators`` export format: vLLM's native one, what ``vllm-project/speculators`` writes.

``config.json``: ``speculators_model_type "eagle3"``, ``transformer_layer_config``, ``speculators_config``
(proposal method, verifier), ``draft_vocab_size``, ``norm_before_residual`` false and the aux layers in vLLM's
numbering; the weights file holds the decoder layer under ``layers.0.*``.
"""

from __future__ import annotations

import torch

from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig
from tandem.speculative.export.engine_conventions import dtype_name, layer_config, vllm_aux_layer_ids

SPECULATORS_ARCHITECTURE = "Eagle3Speculator"


def speculators_config(config: Eagle3DraftConfig, dtype: torch.dtype, aux_layer_ids: list[int],
                       verifier: str, verifier_architectures: list[str] | None = None,
                       speculative_tokens: int = 3) -> dict:
    """The ``config.json`` of the ``speculators`` format: the fields vLLM's speculators adapter reads.

    ``norm_before_residual`` is written false on purpose: the adapter's default is true (the residual
    taken after ``hidden_norm``), and tandem's draft keeps the un-normalised hidden state as residual.
    """
    out = {
        "architectures": [SPECULATORS_ARCHITECTURE],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config(config, dtype),
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": vllm_aux_layer_ids(aux_layer_ids),
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens)}],
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures or [])},
        },
        "torch_dtype": dtype_name(dtype),
    }
    return out
