"""Decode caches for targets whose layers keep a recurrent state (hybrid attention: Qwen3-Next's gated DeltaNet).

A key/value cache forgets rejected proposals by dropping their positions. A linear-attention layer keeps no
positions, only a short convolution window and one recurrent state that every token advances, so rejected
proposals would stay folded into it. transformers' hybrid cache can record, during a forward, the recurrent
state after each of its last positions and roll back to any of them (``activate_past_recording`` then
``crop(-r)``): that is what a decode cache for such a target does here. It was measured against the other way
(snapshot the state before each verification, restore it and re-run the accepted prefix): docs/experiments.md.

A draft tree cannot be verified on such a layer: its positions are branches, not one sequence, and a recurrent
state has no mask to keep a branch from reading its siblings. Such targets decode chains (``TreeUnsupportedError``).
"""

from __future__ import annotations

ROLLBACK_POSITIONS = 64
"""The most positions one crop may remove after a forward: the recurrent state is recorded after each of a
forward's last ``ROLLBACK_POSITIONS`` positions (each recorded state costs one state's memory per layer)."""

RECURRENT_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
"""``config.layer_types`` entries whose cache layer keeps a recurrent or convolution state (transformers 5)."""


class TreeUnsupportedError(ValueError):
    """A draft tree was sent to a target with recurrent layers (see the module docstring)."""


def recurrent_layer_ids(config) -> list[int]:
    """The decoder layers of ``config`` (a transformers config; a VLM's text config is used) that keep a recurrent
    state; empty for a pure-attention target."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    return [i for i, kind in enumerate(types) if kind in RECURRENT_LAYER_TYPES]


def tree_refusal(config) -> str | None:
    """Why a draft tree cannot be verified on this target (one line), or None when it can."""
    layers = recurrent_layer_ids(config)
    if not layers:
        return None
    kind = getattr(config, "model_type", "this target")
    return (f"{kind} keeps a recurrent state in {len(layers)} linear-attention layers (e.g. layer {layers[0]}): "
            f"a draft tree cannot be verified on them (a tree is not a sequence); decode a chain (drop --tree)")


def new_decode_cache(config):
    """An empty transformers cache for decoding ``config``'s target: a plain ``DynamicCache`` for attention-only
    targets; for hybrid ones a cache built from the config's layer types, recording the recurrent state after
    each of a forward's last ``ROLLBACK_POSITIONS`` positions so that ``rollback`` can crop it."""
    from transformers import DynamicCache

    if not recurrent_layer_ids(config):
        return DynamicCache()
    cache = DynamicCache(config=config)
    cache.activate_past_recording(recurrent_states_to_keep=ROLLBACK_POSITIONS)
    return cache


def is_recording(cache) -> bool:
    """Whether ``cache`` has layers that record their recurrent states (``new_decode_cache`` of a hybrid target)."""
    return any(getattr(layer, "record_past", False) for layer in getattr(cache, "layers", ()))


def forget_history(cache) -> None:
    """Before a forward: drop the states recorded by the one before (its positions are kept now), so that a
    recording cache holds one forward's history at most, and its convolution windows their working size."""
    for layer in getattr(cache, "layers", ()):
        # crop(0) drops a linear-attention layer's history (once it holds a state; a no-op on key/value layers).
        if getattr(layer, "record_past", False) and all(layer.is_conv_states_initialized.values()):
            layer.crop(0)


def rollback(cache, remove: int) -> None:
    """Remove the last ``remove`` positions of a transformers cache; in a recording one (a hybrid target's) they
    must all come from the last forward, whose recorded states give the recurrent state before them."""
    for layer in getattr(cache, "layers", ()):
        history = getattr(layer, "recurrent_states_history", None)
        if getattr(layer, "record_past", False) and history and remove > len(history[0]):
            raise ValueError(f"cannot remove {remove} positions from a recurrent cache: only the states after the "
                             f"last {len(history[0])} positions of the last forward are recorded")
    cache.crop(-remove)


def check_tree_support(target, tree) -> None:
    """``TreeUnsupportedError`` when ``tree`` is set and ``target`` (anything with a ``tree_refusal``: in-process
    or remote) cannot verify a draft tree."""
    refusal = getattr(target, "tree_refusal", None) if tree is not None else None
    if refusal:
        raise TreeUnsupportedError(refusal)
