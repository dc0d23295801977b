"""Eagle3TargetModel: run the frozen target, capture the aux hidden states a draft reads, shift for the draft.

EAGLE-3 trains the draft on a fusion of low, middle and high target layers; DFlash on K layers spread over the
target (``draft_layers.py``). Forward hooks on the decoder layers keep the outputs of the layers a forward asks
for (the wrapper's own, or a session's); nothing in the target is modified, so any transformers decoder (Llama,
Qwen2/Qwen3, Mistral) works as long as it exposes ``model.model.layers``.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from tandem.models import text_config
from tandem.speculative.target.draft_layers import (  # noqa: F401 - capturable_layers: the original module's name
    DFLASH,
    EAGLE3,
    CaptureSpec,
    capturable_layers,
    default_eagle3_layer_ids,
    validate_layer_ids,
)
from tandem.speculative.target.supervision import compute_supervision, shift_left
from tandem.speculative.target.vision import forget_rope_deltas, image_token_types, mask_vision_tokens, vision_token_ids


class VocabMappingMissingError(RuntimeError):
    """Supervision was asked for before ``set_vocab_mapping`` gave the draft vocabulary."""


class TargetBatch(NamedTuple):
    """What one target forward gives the draft (B batch, S sequence, H hidden, V target vocab).

    aux_hidden_states: ``[B, S, 3H]`` target dtype, the three captured layers concatenated; not shifted.
    logits: ``[B, S, V]`` target dtype, shifted left by one with a zero tail.
    input_ids: ``[B, S]`` long, shifted left by one with a zero tail.
    loss_mask: ``[B, S]`` as given, shifted left by one with a zero tail.
    attention_mask: ``[B, S]`` as given, not shifted.
    """

    aux_hidden_states: torch.Tensor
    logits: torch.Tensor
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's default layers (``draft_layers.default_eagle3_layer_ids``)."""
    return default_eagle3_layer_ids(num_layers)


def validate_aux_layer_ids(aux_layer_ids: list[int], num_layers: int) -> list[int]:
    """Three distinct layers in ``capturable_layers(num_layers)``; a clear error otherwise."""
    return validate_layer_ids(EAGLE3, aux_layer_ids, num_layers)


class UnsupportedTargetError(ValueError):
    """A model tandem cannot use as a target; the message names what it lacks."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM (``model.model.layers``), or of a vision-language
    model's language model (``model.model.language_model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedTargetError(f"{type(model).__name__} has no model.layers (nor model.language_model.layers): "
                                     f"not a decoder-only transformers target tandem can capture aux states from")
    return layers


class AuxHiddenCapture:
    """Forward hooks that keep the output of the asked-for decoder layers during one forward.

    Every decoder layer has a hook, so each forward may ask for another set (``expect``); a hook keeps a
    reference to its layer's output only when that layer is asked for.
    """

    def __init__(self, layers: nn.ModuleList, layer_ids: list[int]):
        self.layer_ids = list(layer_ids)
        self._wanted = set(self.layer_ids)
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, layer_id: int):
        def keep_output(_module, _inputs, output):
            if layer_id in self._wanted:
                # Decoder layers return a tensor in transformers 5, a tuple (hidden, ...) before.
                self.captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return keep_output

    def expect(self, layer_ids: list[int] | None) -> list[int]:
        """Capture ``layer_ids`` (None: the default ``layer_ids``) in the next forward; returns them."""
        ids = self.layer_ids if layer_ids is None else list(layer_ids)
        self._wanted = set(ids)
        return ids

    def take(self, layer_ids: list[int] | None = None) -> torch.Tensor:
        """``[B, S, K*H]``: the captured layers in ``layer_ids`` order (default ``self.layer_ids``); clears the
        capture and goes back to the default layers."""
        ids = self.layer_ids if layer_ids is None else list(layer_ids)
        missing = [i for i in ids if i not in self.captured]
        if missing:
            raise RuntimeError(f"aux layers {missing} did not run in the last forward")
        first = self.captured[ids[0]].device  # layers placed over several devices (--device-map)
        out = torch.cat([self.captured[i].to(first) for i in ids], dim=-1)
        self.captured.clear()
        self._wanted = set(self.layer_ids)
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Eagle3TargetModel:
    """The frozen target as the draft's teacher, in the trainer's own process.

    The remote client (``remote.client.RemoteEagle3TargetModel``) exposes the same ``supervise``,
    ``get_input_embeddings``, ``set_vocab_mapping`` and ``model_info``, so the training loop does not
    know which one it holds.

    Arguments:
        model: a transformers causal LM (eval mode; gradients are never taken).
        aux_layer_ids: the decoder layers captured by default; default: the draft method's (EAGLE-3
            ``[1, L//2 - 1, L - 4]``; DFlash ``draft_layers.default_dflash_layer_ids``).
        draft_method: ``eagle3`` or ``dflash`` (what ``aux_layer_ids`` is checked against; see ``draft_layers.py``).
        num_draft_layers: DFlash: the draft's layer count, which picks the default layers.

    A forward may capture other layers than the default (``layer_ids`` of ``generate_batch``, ``greedy_forward``):
    a target server answers each session with the layers it declared.
    """

    def __init__(self, model: nn.Module, aux_layer_ids: list[int] | None = None, draft_method: str = EAGLE3,
                 num_draft_layers: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = text_config(model.config)  # a vision-language target: its language model's
        num_layers = self.config.num_hidden_layers
        spec = CaptureSpec.resolve(draft_method, aux_layer_ids, num_layers, num_draft_layers)
        self.draft_method = spec.method
        self.aux_layer_ids = list(spec.layer_ids)
        self._capture = AuxHiddenCapture(decoder_layers(model), self.aux_layer_ids)
        self.selected_token_ids: torch.Tensor | None = None
        self.selected_token_mask: torch.Tensor | None = None
        self._vision_token_ids = vision_token_ids(model.config)  # never trained (``vision.py``)
        self._images: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def with_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """The forwards inside see these images (a vision-language target; see ``vision.py``).

        Arguments:
            pixel_values: ``[P, C*T*p*p]`` float, the image processor's patches of every image of the batch.
            image_grid_thw: ``[I, 3]`` long, each image's patch grid (time, height, width), in placeholder order.
        """
        if not self._vision_token_ids:
            raise UnsupportedTargetError(f"{type(self.model).__name__} is not a vision-language model: it takes no "
                                         f"images")
        self._images = {"pixel_values": pixel_values.to(self.device, self.dtype),
                        "image_grid_thw": image_grid_thw.to(self.device, torch.long)}
        try:
            yield self
        finally:
            self._images = {}

    def _image_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The images' forward arguments, with ``mm_token_type_ids [B, S]`` (1 on image tokens): without it
        transformers cannot build M-RoPE's 3-D positions and runs the language model on 1-D ones, which is not
        the model the engines serve (``vision.py``)."""
        if not self._images:
            return {}
        return {**self._images, "mm_token_type_ids": image_token_types(input_ids, self._vision_token_ids[0])}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def generate_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       loss_mask: torch.Tensor, layer_ids: list[int] | None = None) -> TargetBatch:
        """Run the target once and return the draft's raw teaching signal.

        Arguments:
            input_ids: ``[B, S]`` long token ids.
            attention_mask: ``[B, S]`` 1 on real tokens, 0 on padding.
            loss_mask: ``[B, S]`` 1 where the draft is trained (assistant tokens); a vision-language target's
                image tokens are never trained, whatever it says (``vision.py``).
            layer_ids: the layers to capture (checked by the caller); None: ``aux_layer_ids``.

        Returns:
            ``TargetBatch`` (see its docstring for shapes and shifting).
        """
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        loss_mask = mask_vision_tokens(loss_mask.to(device), input_ids, self._vision_token_ids)
        ids = self._capture.expect(layer_ids)
        try:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **self._image_inputs(input_ids))
        finally:
            forget_rope_deltas(self.model)
        aux = self._capture.take(ids)
        return TargetBatch(
            aux_hidden_states=aux,
            logits=shift_left(outputs.logits),
            input_ids=shift_left(input_ids),
            loss_mask=shift_left(loss_mask),
            attention_mask=attention_mask,
        )

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache, tree_parents: list[int] | None = None,
                       layer_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding forward with a transformers KV ``cache`` (it grows by the new positions).

        Arguments:
            input_ids: ``[B, n]`` long, the positions after those already in ``cache``.
            tree_parents: for a draft tree (``decoding/tree.py``), the parent of each new position (an index
                into ``input_ids``'s n, -1 for the first): each position then sees the cache, its ancestors
                and itself, at the position of its depth. None: the n positions are a causal chain.
            layer_ids: the layers to capture; None: ``aux_layer_ids``.

        Returns:
            logits ``[B, n, V]`` float32 and aux hidden states ``[B, n, K*H]`` (target dtype), neither shifted.

        The logits are float32 whatever the target dtype: the last projection runs in float32 on the
        final hidden state. Rounded to bfloat16 (8 bits of mantissa: steps of 0.125 at a logit of 30), the
        top two logits of SmolLM2 tie exactly at about one token in 100, and which of them ``argmax``
        picks then depends on whether the position was computed in a 1-token forward (greedy decoding)
        or a (k+1)-token one (speculative verification): most held-out bf16 decodes diverged that way,
        every time at a tie (docs/training.md, "bf16 and equal to greedy"). Greedy and speculative decoding
        both go through here, so both pick from the same float32 logits.
        """
        input_ids = input_ids.to(self.device)
        self._prepare_cache(cache, tree_parents)
        layout = self._tree_layout(cache, tree_parents)
        head = self._float32_head()
        ids = self._capture.expect(layer_ids)
        if head is None:
            outputs = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, **layout)
            return outputs.logits.float(), self._capture.take(ids)
        hidden = self.model.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                                  **layout).last_hidden_state
        return torch.nn.functional.linear(hidden.float(), head), self._capture.take(ids)

    def _tree_layout(self, cache, tree_parents: list[int] | None) -> dict:
        """The ``attention_mask`` ``[1, 1, n, past + n]`` (additive, target dtype) and ``position_ids [1, n]`` of
        a tree verification after the ``past`` cached positions; nothing for a chain."""
        if tree_parents is None:
            return {}
        from tandem.speculative.decoding.tree import ancestor_mask

        past, n = cache.get_seq_length(), len(tree_parents)
        allowed = torch.ones(n, past + n, dtype=torch.bool, device=self.device)
        allowed[:, past:] = ancestor_mask(tree_parents, self.device)
        mask = torch.zeros(1, 1, n, past + n, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        depths = allowed[:, past:].sum(-1) - 1  # a position's ancestors in the tree are its depth
        return {"attention_mask": mask, "position_ids": (past + depths).unsqueeze(0)}

    @torch.no_grad()
    def greedy_forward(self, input_ids: torch.Tensor, cache, tree_parents: list[int] | None = None,
                       layer_ids: list[int] | None = None):
        """``forward_cached``'s greedy answer without its float32 logits: a ``verification.VerifyStep`` of
        ``next_token_ids [B, n]`` long (the argmax of the float32 logits), ``near_ties [B, n]`` bool and
        ``aux_hidden_states [B, n, K*H]`` for ``input_ids [B, n]`` long after the positions in ``cache``
        (``tree_parents``, ``layer_ids``: see ``forward_cached``).

        For a bf16 or fp16 target the projection runs in the target's dtype and only a few candidates a position
        are scored in float32 (``verification.greedy_from_hidden``): the same tokens and near-tie flags as the
        float32 logits, at a fifth of the cost for a verification of 6 tokens."""
        from tandem.speculative.decoding.verification import VerifyStep, greedy_from_hidden, greedy_step

        head = self._output_head()
        if head is None or self.dtype == torch.float32:
            logits, aux = self.forward_cached(input_ids, cache, tree_parents, layer_ids)
            return greedy_step(logits, aux, self.dtype)
        self._prepare_cache(cache, tree_parents)
        ids = self._capture.expect(layer_ids)
        hidden = self.model.model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True,
                                  **self._tree_layout(cache, tree_parents)).last_hidden_state
        aux = self._capture.take(ids)
        return VerifyStep(*greedy_from_hidden(hidden, head.weight), aux)

    @property
    def tree_refusal(self) -> str | None:
        """Why this target cannot verify a draft tree (one line: its layers keep a recurrent state), or None."""
        from tandem.speculative.decoding.recurrent_state import tree_refusal

        return tree_refusal(self.config)

    def new_decode_cache(self):
        """An empty transformers cache for decoding this target (``recurrent_state.new_decode_cache``)."""
        from tandem.speculative.decoding.recurrent_state import new_decode_cache

        return new_decode_cache(self.config)

    def _prepare_cache(self, cache, tree_parents: list[int] | None) -> None:
        """Before a decoding forward on ``cache``: refuse a tree this target cannot verify, and let a hybrid
        target's cache drop the recurrent states recorded by the previous forward (``recurrent_state``)."""
        from tandem.speculative.decoding.recurrent_state import TreeUnsupportedError, forget_history

        if tree_parents is not None and self.tree_refusal is not None:
            raise TreeUnsupportedError(self.tree_refusal)
        forget_history(cache)

    def decode_session(self, layer_ids: list[int] | None = None):
        """A ``verification.LocalDecodeSession``: one sequence's KV cache, for ``decode.py``; its steps capture
        ``layer_ids`` (checked here; None: ``aux_layer_ids``)."""
        from tandem.speculative.decoding.verification import LocalDecodeSession

        if layer_ids is not None:  # any distinct capturable layers (the DFlash rule is the general one)
            layer_ids = validate_layer_ids(DFLASH, layer_ids, self.config.num_hidden_layers)
        return LocalDecodeSession(self, layer_ids)

    def _output_head(self) -> nn.Linear | None:
        """The output projection (looked up once) when the logits are exactly ``lm_head(model.model(...))``;
        None for targets whose logits are more than that."""
        from tandem.speculative.target.compact import output_projection

        if not hasattr(self, "_head"):
            self._head = output_projection(self.model) if hasattr(self.model, "model") else None
        return self._head

    def _float32_head(self) -> torch.Tensor | None:
        """``[V, H]`` float32 copy of ``_output_head`` (made once); None where there is none."""
        if not hasattr(self, "_head32"):
            head = self._output_head()
            self._head32 = None if head is None else head.weight.detach().float()
        return self._head32

    def set_vocab_mapping(self, selected_token_ids: torch.Tensor, selected_token_mask: torch.Tensor) -> None:
        """Fix the draft vocabulary: ``selected_token_ids [Vd]`` long, ``selected_token_mask [V]`` bool."""
        vocab_size = self.config.vocab_size
        if selected_token_mask.shape != (vocab_size,):
            raise ValueError(f"selected_token_mask must have shape [{vocab_size}], got "
                             f"{list(selected_token_mask.shape)}")
        if selected_token_ids.dim() != 1 or selected_token_ids.numel() == 0:
            raise ValueError(f"selected_token_ids must be a non-empty 1-D tensor, got {list(selected_token_ids.shape)}")
        if int(selected_token_ids.min()) < 0 or int(selected_token_ids.max()) >= vocab_size:
            raise ValueError(f"selected_token_ids must lie in [0, {vocab_size})")
        self.selected_token_ids = selected_token_ids.to(self.device, torch.long)
        self.selected_token_mask = selected_token_mask.to(self.device, torch.bool)

    def supervise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The supervision dict keyed by ``SUPERVISION_KEYS`` (see ``compute_supervision``)."""
        if self.selected_token_ids is None:
            raise VocabMappingMissingError("set_vocab_mapping must be called before supervision is computed")
        return compute_supervision(
            self, self.selected_token_ids, self.selected_token_mask, input_ids, attention_mask, loss_mask
        )

    def supervise_compact(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The compact supervision dict (``compact.COMPACT_SUPERVISION_KEYS``): the final hidden state in
        place of ``target_probs`` (see ``compact.compute_compact_supervision``); arguments as ``supervise``."""
        from tandem.speculative.target.compact import compute_compact_supervision

        if self.selected_token_ids is None:
            raise VocabMappingMissingError("set_vocab_mapping must be called before supervision is computed")
        return compute_compact_supervision(
            self, self.selected_token_ids, self.selected_token_mask, input_ids, attention_mask, loss_mask
        )

    def draft_lm_head(self) -> torch.Tensor:
        """``[Vd, H]`` (target dtype): the target's ``lm_head`` rows of the draft vocabulary, which turn a
        compact answer into ``target_probs`` (``compact.expand_supervision``)."""
        from tandem.speculative.target.compact import draft_lm_head

        if self.selected_token_ids is None:
            raise VocabMappingMissingError("set_vocab_mapping must be called before the draft lm_head is taken")
        return draft_lm_head(self.model, self.selected_token_ids)

    def get_input_embeddings(self) -> torch.Tensor:
        """``[V, H]`` the target's token embedding (seeds the draft's frozen embedding)."""
        return self.model.get_input_embeddings().weight.detach()

    def model_info(self) -> dict:
        """Layers, hidden and vocabulary sizes, aux layers; and ``verifies_trees: False`` for a target that cannot
        verify a draft tree (a remote client reads it from the server's ``/model_info``)."""
        info = {
            "num_hidden_layers": int(self.config.num_hidden_layers),
            "hidden_size": int(self.config.hidden_size),
            "vocab_size": int(self.config.vocab_size),
            "aux_layer_ids": list(self.aux_layer_ids),
        }
        if self.tree_refusal is not None:
            info["verifies_trees"] = False
        return info

    def close(self) -> None:
        self._capture.remove()
