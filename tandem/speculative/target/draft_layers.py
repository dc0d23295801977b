"""Which target layers a draft method reads: the capture a training or decoding session declares.

EAGLE-3 reads three layers (low, middle, high); DFlash reads K layers spread over the target (K = the
draft's layer count by default). A session names its method and layers once (``CaptureSpec``); the target
captures exactly those in the same forward, and every record downstream (the supervision cache's key, a
checkpoint, an export) carries them, so supervision for one set of layers is never trained on by a draft
of another. On the wire the spec travels in one request header (``CaptureSpec.header_value``); a request
without it (every client of the original design) gets the server's own three EAGLE-3 layers.
"""

from __future__ import annotations

from dataclasses import dataclass

EAGLE3 = "eagle3"
DFLASH = "dflash"
DRAFT_METHODS = (EAGLE3, DFLASH)
DEFAULT_METHOD = EAGLE3
# The most layers one session may ask for: bounds the answer (K x H a token) whatever the target's depth.
MAX_CAPTURED_LAYERS = 64


def capturable_layers(num_layers: int) -> range:
    """The decoder layers whose output every serving engine can capture: ``0 .. L-2``.

    SGLang and vLLM both record a layer's *input* inside their decoder loop (the output of the layer
    before it), so the output of the last layer, which is no later layer's input, is never captured.
    """
    return range(max(num_layers - 1, 0))


def default_eagle3_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low/middle/high layers ``[1, L//2 - 1, L - 4]``; for shallow targets, where those
    collide, three spread over the capturable layers ``0 .. L-2`` (see ``capturable_layers``)."""
    last = num_layers - 2
    if last < 2:
        raise ValueError(f"EAGLE-3 needs three distinct aux layers whose outputs a serving engine can capture "
                         f"(layers 0 .. L-2: the last layer's output is never captured); the target has only "
                         f"{num_layers} layers")
    ids = [1, num_layers // 2 - 1, num_layers - 4]
    if len(set(ids)) == 3 and all(0 <= i <= last for i in ids):
        return ids
    return [0, last // 2, last]


def default_dflash_layer_ids(num_layers: int, num_draft_layers: int) -> list[int]:
    """The DFlash reference's layers: ``round(1 + i * (L - 4) / (n - 1))`` for ``i in 0..n-1`` (Qwen3-8B, L = 36,
    n = 5: ``[1, 9, 17, 25, 33]``), ``[L // 2]`` for one draft layer. Python's ``round`` (half to even), as in
    z-lab/dflash, SpecForge and SGLang. For a target too shallow to give n distinct layers that way, n layers
    spread evenly over ``capturable_layers`` instead (an error when there are fewer than n)."""
    if num_draft_layers < 1:
        raise ValueError(f"a DFlash draft needs at least one layer, got {num_draft_layers}")
    if num_draft_layers == 1:
        ids = [num_layers // 2]
    else:
        span = num_layers - 4
        ids = [int(round(1 + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]
    last = num_layers - 2
    if len(set(ids)) == len(ids) and all(0 <= i <= last for i in ids):
        return ids
    if num_draft_layers > last + 1:
        raise ValueError(f"a {num_draft_layers}-layer DFlash draft reads {num_draft_layers} distinct target layers; "
                         f"the target has {last + 1} whose output an engine can capture (0 .. {last})")
    if num_draft_layers == 1:
        return [last // 2]
    return [int(round(i * last / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def validate_layer_ids(method: str, layer_ids, num_layers: int) -> list[int]:
    """Check a session's layers for ``method`` on an ``num_layers``-layer target: EAGLE-3 three distinct ones,
    DFlash one to ``MAX_CAPTURED_LAYERS`` distinct ones, all in ``capturable_layers``; ``ValueError`` naming the
    problem otherwise."""
    if method not in DRAFT_METHODS:
        raise ValueError(f"unknown draft method {method!r}; known: {list(DRAFT_METHODS)}")
    ids = [int(i) for i in layer_ids]
    if method == EAGLE3 and (len(ids) != 3 or len(set(ids)) != 3):
        raise ValueError(f"aux_layer_ids must be three distinct layer indices, got {ids}")
    if not 1 <= len(ids) <= MAX_CAPTURED_LAYERS or len(set(ids)) != len(ids):
        raise ValueError(f"{method} reads 1 to {MAX_CAPTURED_LAYERS} distinct target layers, got {ids}")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"aux_layer_ids {bad} out of range for a target with {num_layers} layers")
    if num_layers - 1 in ids:
        raise ValueError(f"aux layer {num_layers - 1} is the target's last layer: no serving engine captures its "
                         f"output (SGLang and vLLM record layer inputs), so a draft trained on it would be served "
                         f"other states; choose layers in 0 .. {num_layers - 2}")
    return ids


@dataclass(frozen=True)
class CaptureSpec:
    """A session's draft method and the target layers it reads (output of each layer, 0-based, in this order)."""

    method: str
    layer_ids: tuple[int, ...]

    @classmethod
    def resolve(cls, method: str, layer_ids, num_layers: int, num_draft_layers: int | None = None) -> "CaptureSpec":
        """The spec for ``method`` on an ``num_layers``-layer target: ``layer_ids`` checked, or the method's
        defaults (DFlash: one layer a draft layer, ``num_draft_layers``)."""
        if method not in DRAFT_METHODS:
            raise ValueError(f"unknown draft method {method!r}; known: {list(DRAFT_METHODS)}")
        if layer_ids is None:
            if method == EAGLE3:
                layer_ids = default_eagle3_layer_ids(num_layers)
            else:
                layer_ids = default_dflash_layer_ids(num_layers, num_draft_layers or 1)
        return cls(method, tuple(validate_layer_ids(method, layer_ids, num_layers)))

    def header_value(self) -> str:
        """``"dflash:1,9,17"``: the capture header's value."""
        return f"{self.method}:{','.join(str(i) for i in self.layer_ids)}"

    @classmethod
    def parse_header(cls, value: str, num_layers: int) -> "CaptureSpec":
        """The spec a capture header names, checked against the target; ``ValueError`` for anything else."""
        shown = value[:80] if value.isprintable() else "(unprintable)"
        method, sep, ids = value.partition(":")
        parts = ids.split(",") if sep else []
        if not sep or not parts or len(parts) > MAX_CAPTURED_LAYERS or not all(
                p.strip().isascii() and p.strip().isdigit() and len(p.strip()) <= 6 for p in parts):
            raise ValueError(f"capture must be METHOD:ID,ID,... (at most {MAX_CAPTURED_LAYERS} layer ids), "
                             f"got {shown!r}")
        return cls(method, tuple(validate_layer_ids(method, [int(p) for p in parts], num_layers)))
