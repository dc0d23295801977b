"""How large a ``/generate`` the target server accepts: a token budget checked before the forward.

A ``/generate`` body is small (a few bytes a token) but its forward is not: logits alone take ``V x 4``
bytes a token in fp32 (196 KiB for SmolLM2's 49,152-token vocabulary), and eager attention adds a
``heads x S`` row a token. A 117 KiB request of one 40,000-token row asked a CPU target for 6.4 GB. So the
server refuses with 413, before decoding more than the shapes, any request whose ``B x S`` is above
``max_batch_tokens`` or whose ``S`` is above the target's context window, and the request body limit of
``/generate`` follows from the budget (no body larger than the largest acceptable batch is read at all).

The default budget is what fits: half the memory free on the target's device once the target is loaded,
divided by an estimate of a forward's bytes per token (:func:`forward_bytes_per_token`).

A draft tree of ``n`` nodes after ``past`` cached positions costs more than a chain of ``n``: its attention
mask is ``n x (past + n)``, built and copied whole, so a star of thousands of nodes grows as ``n**2`` inside a
budget sized for linear cost. :func:`tree_tokens` charges a tree its mask too, in tokens' worth of memory.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from tandem.speculative.remote.serving.request_checks import RequestError

logger = logging.getLogger(__name__)

# The default budget spends at most this share of the memory free at start-up on one forward.
MEMORY_SHARE = 0.5
_MIN_BUDGET, _MAX_BUDGET = 256, 1 << 22
# The widest /generate entry is int64: 8 bytes a token for each of the three request tensors, plus headers.
_REQUEST_BYTES_PER_TOKEN = 3 * 8
_REQUEST_OVERHEAD_BYTES = 4096


def _config(target_wrapper):
    return getattr(getattr(target_wrapper, "model", None), "config", None)


def context_window(target_wrapper) -> Optional[int]:
    """The target's ``max_position_embeddings`` (None when it does not say)."""
    value = getattr(_config(target_wrapper), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def forward_bytes_per_token(target_wrapper) -> int:
    """An estimate of a supervision forward's peak bytes per token of ``B x S`` (no gradients).

    fp32 logits three times over (the logits, their fp32 copy, the softmax over the draft vocabulary is
    at most as large), the captured aux states and a few hidden-size and MLP-width working buffers in the
    target dtype, and, for eager attention, one fp32 score row of the context window per head, twice.
    """
    info = target_wrapper.model_info()
    config = _config(target_wrapper)
    hidden, vocab = int(info["hidden_size"]), int(info["vocab_size"])
    itemsize = getattr(getattr(target_wrapper, "dtype", torch.float32), "itemsize", 4)
    intermediate = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    per_token = 3 * 4 * vocab + itemsize * (3 * hidden + 8 * hidden + 3 * intermediate)
    if getattr(config, "_attn_implementation", "eager") == "eager":
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        per_token += 2 * 4 * heads * (context_window(target_wrapper) or 4096)
    return per_token


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's free memory, else the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30  # no /proc: assume a small machine


def default_max_batch_tokens(target_wrapper, device: torch.device) -> int:
    """``MEMORY_SHARE`` of the free memory over :func:`forward_bytes_per_token`, a multiple of 256."""
    budget = int(MEMORY_SHARE * free_memory_bytes(device)) // forward_bytes_per_token(target_wrapper)
    return max(_MIN_BUDGET, min(_MAX_BUDGET, budget // 256 * 256))


def generate_body_limit(max_batch_tokens: int) -> int:
    """Bytes of the largest ``/generate`` body a batch within the budget can take (int64 tensors)."""
    return _REQUEST_BYTES_PER_TOKEN * max_batch_tokens + _REQUEST_OVERHEAD_BYTES


def mask_bytes_per_entry(itemsize: int) -> int:
    """Bytes one entry of a tree's ``n x (past + n)`` mask costs: the additive mask in the target dtype and the
    attention's copy of it, plus the bool ancestor mask and its negation."""
    return 2 * itemsize + 4


def tree_tokens(past: int, n: int, bytes_per_token: int, itemsize: int) -> int:
    """Tokens a ``/verify`` of a draft tree of ``n`` nodes after ``past`` cached positions is charged: the
    ``past + n`` a chain is, plus its mask's bytes in tokens' worth (``bytes_per_token``: a forward's)."""
    mask = n * (past + n) * mask_bytes_per_entry(itemsize)
    return past + n + -(-mask // max(bytes_per_token, 1))


def check_tree_cost(past: int, n: int, max_batch_tokens: int, bytes_per_token: int, itemsize: int) -> None:
    """413 when a draft tree's charge (:func:`tree_tokens`) exceeds ``max_batch_tokens``."""
    charge = tree_tokens(past, n, bytes_per_token, itemsize)
    if charge > max_batch_tokens:
        raise RequestError(413, f"verify: a draft tree of {n} nodes after {past} cached positions has an attention "
                                f"mask of {n} x {past + n} entries and is charged {charge} tokens, over this server's "
                                f"budget of {max_batch_tokens} tokens a request (--max-batch-tokens); verify smaller "
                                f"trees")


def check_batch_shape(batch: int, seq: int, max_batch_tokens: int, max_seq_len: Optional[int],
                      what: str = "generate") -> None:
    """413 when ``batch x seq`` exceeds ``max_batch_tokens`` or ``seq`` the context window ``max_seq_len``."""
    if max_seq_len is not None and seq > max_seq_len:
        raise RequestError(413, f"{what}: sequence length {seq} exceeds the target's context window of {max_seq_len} "
                                f"tokens")
    if batch * seq > max_batch_tokens:
        raise RequestError(413, f"{what}: batch of {batch} x {seq} = {batch * seq} tokens exceeds this server's "
                                f"budget of {max_batch_tokens} tokens a request (--max-batch-tokens); send smaller "
                                f"batches")
