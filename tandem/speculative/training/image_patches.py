"""A vision-language target's images for training: files -> the image processor's patches -> placeholder positions.

The trainer runs the target's own image processor (``AutoImageProcessor`` of the target, or of ``--tokenizer``
for a remote target): once per image when the data is read (to learn its patch grid, hence how many positions its
placeholder takes, and to refuse an unreadable file before training starts), and again when a batch holding it is
built (the patches are not kept in memory: a 448 x 448 image is 4.8 MB of them). A conversation's
``image_records.IMAGE_MARKER`` becomes the target's placeholder text (``<|vision_start|><|image_pad|>
<|vision_end|>`` for Qwen2-VL, Qwen2.5-VL, Qwen3-VL), the placeholder is expanded to the image's positions and
those positions are never trained (``target/vision.py``).

A batch holding images carries them as ``pixel_values [P, C*T*p*p]`` float32 (every image of the batch, row by
row), ``image_grid_thw [I, 3]`` long and ``images_per_row [B]`` long; ``image_context`` hands them to the target
(in-process or remote) around a forward, and ``row_images`` cuts them back into each row's (the supervision
cache answers one sample at a time).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Sequence

import torch

from tandem.speculative.target.vision import tokenize_image_conversation, vision_token_ids
from tandem.speculative.training.image_records import IMAGE_MARKER

logger = logging.getLogger(__name__)

IMAGE_BATCH_KEYS = ("pixel_values", "image_grid_thw", "images_per_row")
"""What a batch holding images carries beside its token ids (see the module docstring)."""

Patches = tuple[torch.Tensor, torch.Tensor]
"""``(pixel_values [P, C*T*p*p] float32, image_grid_thw [I, 3] long)``."""


class ImageProcessingError(ValueError):
    """An image cannot be used (unreadable, or a target that takes none); the message names the file and line."""


class ImagePatches:
    """The target's image processor and placeholder tokens (see the module docstring).

    Arguments:
        processor: a transformers image processor with ``merge_size`` (Qwen2-VL's and its successors').
        target_config: the target's top-level config (``image_token_id`` and the vision special tokens).
        tokenizer: the target's tokenizer (the placeholder tokens' text).
    """

    def __init__(self, processor, target_config, tokenizer):
        self.processor = processor
        self.image_token_id = int(target_config.image_token_id)
        self.merge_size = int(getattr(processor, "merge_size", None)
                              or target_config.vision_config.spatial_merge_size)
        start, end = (getattr(target_config, f, None) for f in ("vision_start_token_id", "vision_end_token_id"))
        ids = [i for i in (start, self.image_token_id, end) if i is not None]
        self.placeholder = "".join(tokenizer.convert_ids_to_tokens(ids))

    @classmethod
    def for_target(cls, spec: str, target_config, tokenizer, source: str = "") -> "ImagePatches":
        """The image processor saved beside the target ``spec`` (an HF directory or hub id); ``source`` names the
        first record with an image (the refusal for a text-only target names it)."""
        if not vision_token_ids(target_config):
            raise ImageProcessingError(f"{source}: the conversation has an image, but the target ({spec}) is not a "
                                       f"vision-language model: it takes text only")
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(spec)
        except (OSError, ValueError) as exc:
            raise ImageProcessingError(f"the target {spec} has no image processor to cut images into patches "
                                       f"({str(exc).splitlines()[0][:200]})") from None
        return cls(processor, target_config, tokenizer)

    def patches(self, paths: Sequence[str], source: str = "") -> Patches:
        """``paths``' images through the processor: ``(pixel_values, image_grid_thw)``; an unreadable file is an
        ``ImageProcessingError`` naming it and ``source``."""
        from PIL import Image, UnidentifiedImageError

        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise ImageProcessingError(f"{source}: image {path} is unreadable ({type(exc).__name__}: "
                                           f"{str(exc)[:160]})") from None
        out = self.processor(images=images, return_tensors="pt")
        pixel_values = out["pixel_values"].to(torch.float32).contiguous()
        return pixel_values, out["image_grid_thw"].to(torch.long).contiguous()

    def tokenize(self, tokenizer, record, max_seq_len: int) -> dict | None:
        """One record with images -> its sample: ``input_ids [S]``, ``loss_mask [S]`` (zero on every image
        position) and ``images`` (the paths); None when an image would be cut by
        ``max_seq_len`` (its positions must all be there to match its patches)."""
        markers = sum(m["content"].count(IMAGE_MARKER) for m in record.messages)
        if markers != len(record.images):
            raise ImageProcessingError(f"{record.source}: {markers} {IMAGE_MARKER} markers for {len(record.images)} "
                                       f"images")
        _pixels, grid = self.patches(record.images, record.source)
        messages = [{**m, "content": m["content"].replace(IMAGE_MARKER, self.placeholder)} for m in record.messages]
        try:
            ids, loss_mask = tokenize_image_conversation(tokenizer, messages, grid, self.image_token_id,
                                                         self.merge_size)
        except ValueError as exc:
            raise ImageProcessingError(f"{record.source}: {exc}") from None
        image = (ids == self.image_token_id).nonzero()
        if len(ids) > max_seq_len and int(image[-1]) >= max_seq_len:
            return None
        return {"input_ids": ids[:max_seq_len], "loss_mask": loss_mask[:max_seq_len],
                "images": list(record.images)}

    def batch(self, samples: Sequence[dict]) -> dict[str, torch.Tensor]:
        """The ``IMAGE_BATCH_KEYS`` of a batch's samples (rows in order; a row without images adds none)."""
        counts = [len(s.get("images", ())) for s in samples]
        paths = [p for s in samples for p in s.get("images", ())]
        pixel_values, grid = self.patches(paths, "a batch")
        return {"pixel_values": pixel_values, "image_grid_thw": grid,
                "images_per_row": torch.tensor(counts, dtype=torch.long)}


def batch_patches(batch: dict) -> Patches | None:
    """A batch's ``(pixel_values, image_grid_thw)``, None when it holds no image."""
    if batch.get("pixel_values") is None or not len(batch["image_grid_thw"]):
        return None
    return batch["pixel_values"], batch["image_grid_thw"]


def image_context(target, patches: Patches | None):
    """``target.with_images(*patches)`` (the forwards inside see them), or nothing to do for ``None``."""
    return contextlib.nullcontext() if patches is None else target.with_images(*patches)


def row_images(batch: dict) -> list[Patches | None]:
    """Each row's ``(pixel_values, image_grid_thw)`` of a batch (None for a row without images)."""
    rows = len(batch["input_ids"])
    if batch_patches(batch) is None:
        return [None] * rows
    pixel_values, grid = batch["pixel_values"], batch["image_grid_thw"]
    patches_per_image = grid.prod(dim=1).tolist()
    out, image, patch = [], 0, 0
    for count in batch["images_per_row"].tolist():
        if count == 0:
            out.append(None)
            continue
        size = sum(patches_per_image[image : image + count])
        out.append((pixel_values[patch : patch + size], grid[image : image + count]))
        image, patch = image + count, patch + size
    return out


def patches_digest(patches: Patches) -> str:
    """SHA-256 hex of ``(pixel_values, image_grid_thw)`` as float32 and int64: what the target reads of a sample's
    images, whatever the files' format, bytes or names (the supervision cache keys image samples by it too)."""
    pixel_values, grid = patches
    digest = hashlib.sha256(grid.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(pixel_values.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
