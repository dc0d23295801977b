"""Images in chat data: where a conversation's images are, and where in its text each one goes.

Three forms are read, the ones vision-language training data comes in:

- content parts (OpenAI and Hugging Face chat messages): a message's content is a list of
  ``{"type": "text", "text": ...}`` and ``{"type": "image", "image": PATH}`` (or ``"path"``/``"url"``) or
  ``{"type": "image_url", "image_url": {"url": PATH}}`` (or ``"image_url": PATH``) parts;
- a top-level ``"images": [PATH, ...]`` (LLaMA-Factory) or ``"image": PATH`` / ``"image_path": PATH`` (LLaVA,
  SpecForge's VLM data) beside ShareGPT ``conversations`` or ``messages``, each image at the next ``<image>``
  in the text, or, when the text has none, all of them at the start of the first user turn (SpecForge's
  layout, Qwen-VL's chat layout).

Every image becomes the marker ``IMAGE_MARKER`` in its message's text and a path in ``ChatRecord.images``,
in order; a relative path is relative to the JSONL file's directory. Only files are read: an ``http(s)://``
URL or a ``data:`` URI is refused in one line (tandem fetches nothing and keeps no image bytes in memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_MARKER = "<image>"
"""Where an image sits in a message's text (LLaVA's marker); replaced by the target's placeholder tokens."""

TOP_LEVEL_IMAGE_KEYS = ("images", "image", "image_path")


def content_text(content: Any, where: str) -> tuple[str, list[str]]:
    """A message's content (a string, or a list of text and image parts) -> ``(text, image references)``, each
    image a ``IMAGE_MARKER`` in the text; ``ValueError`` naming ``where`` (e.g. ``message 2 'content'``)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError(f"{where} is of type {type(content).__name__}, expected a string or a list of parts")
    text, images = [], []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"{where} part {j} is of type {type(part).__name__}, expected a string or a "
                             f"{{\"type\": ...}} object")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where} part {j} (text) has no string 'text'")
            text.append(part["text"])
        elif kind in ("image", "image_url"):
            images.append(_image_reference(part, f"{where} part {j}"))
            text.append(IMAGE_MARKER)
        else:
            raise ValueError(f"{where} part {j} has type {kind!r}; expected 'text', 'image' or 'image_url'")
    return "".join(text), images


def _image_reference(part: dict, where: str) -> str:
    for key in ("image", "path", "url", "image_url"):
        value = part.get(key)
        if isinstance(value, dict):
            value = value.get("url")
        if isinstance(value, str) and value:
            return value
    raise ValueError(f"{where} is an image with no path (give 'image': PATH or 'image_url': {{'url': PATH}})")


def top_level_images(obj: dict) -> list[str]:
    """The image references of a line's top-level ``images`` / ``image`` / ``image_path`` (at most one of them)."""
    present = [k for k in TOP_LEVEL_IMAGE_KEYS if obj.get(k) not in (None, [], "")]
    if len(present) > 1:
        raise ValueError(f"the line has both {present[0]!r} and {present[1]!r}; give its images once")
    if not present:
        return []
    value = obj[present[0]]
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{present[0]!r} must be a path or a list of paths")
    return list(values)


def place_top_level_images(messages: list[dict], count: int) -> None:
    """Put ``count`` top-level images into ``messages`` (in place): at their ``<image>`` markers when the text
    has exactly ``count``, else all at the start of the first user turn when it has none."""
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers == count:
        return
    if markers:
        raise ValueError(f"the line gives {count} images for {markers} {IMAGE_MARKER} markers in its text")
    first_user = next(m for m in messages if m["role"] == "user")
    first_user["content"] = IMAGE_MARKER * count + first_user["content"]


def resolve_image(reference: str, base: Path | None) -> str:
    """A reference -> an absolute path string (``file://`` stripped; relative to ``base``, the JSONL file's
    directory); ``ValueError`` for a URL or a data URI, or a file that is not there."""
    if reference.startswith(("http://", "https://")):
        raise ValueError(f"image {reference[:80]!r} is a URL: tandem fetches nothing; download it and give its path")
    if reference.startswith("data:"):
        raise ValueError("an image is a data: URI: save it to a file and give its path")
    path = Path(reference.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ValueError(f"image {reference!r} not found (looked for {path})")
    return str(path.resolve())
