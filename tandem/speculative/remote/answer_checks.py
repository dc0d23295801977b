"""What the training client accepts from a target server: answers bounded by what it asked for.

Over plain HTTP anything on the path can answer, and a server can be broken or hostile: a
``Content-Length: 2**40`` once made the client read 5.5 GB before failing, and tensors of the wrong shape
were trained on. The client knows every answer's size in advance -- ``B`` and ``S`` from its own request,
``H`` and ``V`` from ``/model_info``, ``Vd`` from the vocabulary it sent -- so it refuses a larger body before
reading it, refuses a data-plane description before allocating for it, and checks every returned
tensor's shape and dtype and every returned token id against the vocabulary (an id past it once ended an
evaluation in an ``IndexError`` deep in the draft). A violation raises :class:`AnswerError`, which the client
reports naming the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch

from tandem.speculative.remote.wire import CODE_TO_DTYPE
from tandem.speculative.target import compact
from tandem.speculative.target.supervision import SUPERVISION_KEYS

# A JSON answer (model info, statuses, errors, data-plane metadata) is a few hundred bytes.
JSON_ANSWER_BYTES = 1 << 20
# Wire headers of a handful of entries (magic, key lengths, keys, flags, dtype codes, shapes, sizes).
_WIRE_OVERHEAD_BYTES = 4096
_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32})
_INTEGERS = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool})


class AnswerError(ValueError):
    """A server's answer is larger than asked for, or a tensor in it has the wrong shape or dtype."""


@dataclass(frozen=True)
class TensorSpec:
    """What one returned tensor must be: exactly ``shape``, one of ``dtypes``, and for token ids every value in
    ``[0, vocab_size)``."""

    shape: tuple[int, ...]
    dtypes: frozenset
    vocab_size: Optional[int] = None

    @property
    def max_bytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * max(dtype.itemsize for dtype in self.dtypes)


def target_dtypes(info: Mapping) -> frozenset:
    """The dtypes a target's hidden states may have: the one ``/model_info`` names, else any usual float."""
    named = getattr(torch, str(info.get("dtype", "")), None)
    return frozenset({named}) if isinstance(named, torch.dtype) and named.is_floating_point else _FLOATS


def supervision_specs(batch: int, seq: int, hidden: int, draft_vocab: int, hidden_dtypes: frozenset,
                      compact_answer: bool, vocab_size: Optional[int] = None,
                      aux_layers: int = 3) -> dict[str, TensorSpec]:
    """The tensors of a ``/generate`` answer for a ``[batch, seq]`` request, by key, in send order (its token
    ids in ``[0, vocab_size)`` when given; ``aux_layers``: the target layers the session captures, three for
    EAGLE-3)."""
    specs = {
        "aux_hidden_states": TensorSpec((batch, seq, aux_layers * hidden), hidden_dtypes),
        "target_probs": TensorSpec((batch, seq, draft_vocab), frozenset({torch.float32})),
        "position_mask": TensorSpec((batch, seq, 1), frozenset({torch.bool})),
        "input_ids": TensorSpec((batch, seq), frozenset({torch.int64}), vocab_size),
        "loss_mask": TensorSpec((batch, seq), _INTEGERS),  # shifted, in the dtype the request sent
    }
    if compact_answer:
        specs[compact.FINAL_HIDDEN_KEY] = TensorSpec((batch, seq, hidden), hidden_dtypes)
        return {key: specs[key] for key in compact.COMPACT_SUPERVISION_KEYS}
    return {key: specs[key] for key in SUPERVISION_KEYS}


def weight_spec(rows: int, hidden: int, dtypes: frozenset = _FLOATS) -> dict[str, TensorSpec]:
    """``{"weight": [rows, hidden]}``: ``/input_embeddings`` (rows = V) and ``/draft_lm_head`` (rows = Vd)."""
    return {"weight": TensorSpec((rows, hidden), dtypes)}


def wire_answer_bytes(*spec_sets: Mapping[str, TensorSpec]) -> int:
    """The largest wire body any of ``spec_sets`` can take (tensor bytes plus headers)."""
    return max(sum(spec.max_bytes for spec in specs.values()) for specs in spec_sets) + _WIRE_OVERHEAD_BYTES


def check_tensors(tensors: Mapping[str, Optional[torch.Tensor]], specs: Mapping[str, TensorSpec]) -> None:
    """``AnswerError`` unless ``tensors`` holds exactly the keys of ``specs``, each of its shape and dtype, its
    token ids (where the spec names a vocabulary) inside it."""
    if set(tensors) != set(specs):
        raise AnswerError(f"answer holds tensors {sorted(tensors)}, expected {sorted(specs)}")
    for key, spec in specs.items():
        tensor = tensors[key]
        if tensor is None:
            raise AnswerError(f"answer holds no {key!r} tensor")
        _check(key, tuple(tensor.shape), tensor.dtype, spec)
        if spec.vocab_size is not None and tensor.numel():
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= spec.vocab_size:
                raise AnswerError(f"tensor {key!r} holds token ids in [{low}, {high}], outside the vocabulary "
                                  f"[0, {spec.vocab_size})")


def check_metadata(keys_order: Sequence[str], metadata: Mapping[str, Optional[dict]],
                   specs: Mapping[str, TensorSpec]) -> None:
    """``AnswerError`` unless a data-plane description announces exactly ``specs``, in their order: checked
    before anything is allocated for the transfer."""
    if list(keys_order) != list(specs):
        raise AnswerError(f"data-plane metadata announces {list(keys_order)}, expected {list(specs)}")
    for key, spec in specs.items():
        entry = metadata.get(key)
        if entry is None:
            raise AnswerError(f"data-plane metadata announces no {key!r} tensor")
        _check(key, tuple(entry["shape"]), CODE_TO_DTYPE[entry["dtype_code"]], spec)


def _check(key: str, shape: tuple, dtype: torch.dtype, spec: TensorSpec) -> None:
    if shape != spec.shape:
        raise AnswerError(f"tensor {key!r} has shape {list(shape)}, expected {list(spec.shape)}")
    if dtype not in spec.dtypes:
        raise AnswerError(f"tensor {key!r} has dtype {dtype}, expected one of {sorted(str(d) for d in spec.dtypes)}")
