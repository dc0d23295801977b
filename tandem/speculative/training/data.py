"""Chat data for EAGLE-3 draft training: JSONL -> ``input_ids`` + ``loss_mask``, batches, regeneration.

The path a conversation takes::

    read_chat_jsonl(path)                       -> list[ChatRecord]   (ShareGPT or messages format)
    regenerate(model, tokenizer, records)       -> list[ChatRecord]   (assistant turns = target's greedy answers)
    TokenizedChatDataset.from_records(...)      -> samples {input_ids [S], loss_mask [S]}
    DeterministicBatchSampler + ChatCollator    -> batches {input_ids, attention_mask, loss_mask} [B, S]

Why regenerate: a draft learns to predict the *target's* next token, so it should train on text the
target itself would write (EAGLE, HASS and SpecForge all regenerate). ``tandem regenerate`` runs
:func:`regenerate_file`; the shipped prompt set (``default_prompt_path("train")``) holds user turns
only, so it must be regenerated before it can be trained on.

Loss masks come from the tokenizer's own chat template: we render prefixes of the conversation and
diff token lengths, so any template whose rendering of a prefix is a prefix of the whole works
(ChatML, Llama 3, Qwen, Mistral...), with no per-template regular expressions.

Resuming: :func:`batch_order` is a pure function of ``(num_samples, batch_size, seed, epoch, rank,
world_size)``, so a run that stops after global step N and restarts with the same arguments calls
``sampler.resume_from_step(N)`` and sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# ShareGPT dumps use several speaker names; these are the ones seen in the wild.
SHAREGPT_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
}
# Tokens that close a turn in the common chat templates; the eos token is added per tokenizer.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
PROMPT_SPLITS = ("train", "heldout")

Message = dict[str, str]


class DataFormatError(ValueError):
    """A chat data file or conversation is malformed; the message names the file and line."""


@dataclasses.dataclass
class ChatRecord:
    """One conversation.

    ``messages`` is a list of ``{"role": "system"|"user"|"assistant", "content": str}``;
    ``extra`` holds the line's other top-level fields (e.g. ``"category"``), carried through
    regeneration and written back by :func:`write_jsonl`.
    """

    messages: list[Message]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Reading and writing JSONL
# --------------------------------------------------------------------------------------------


def _normalise_message(raw: Any, index: int, sharegpt: bool) -> Message:
    """One message of either format -> ``{"role", "content"}``; raises ValueError saying what is wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"message {index} is a {type(raw).__name__}, expected an object")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for key in (role_key, content_key):
        if key not in raw:
            raise ValueError(f"message {index} has no {key!r} key")
    speaker, content = raw[role_key], raw[content_key]
    role = SHAREGPT_ROLE_NAMES.get(speaker) if sharegpt and isinstance(speaker, str) else speaker
    if role not in ROLES:
        known = sorted(SHAREGPT_ROLE_NAMES) if sharegpt else list(ROLES)
        raise ValueError(f"message {index} has unknown role {speaker!r} (expected one of {known})")
    if not isinstance(content, str):
        raise ValueError(f"message {index} has {content_key!r} of type {type(content).__name__}, expected a string")
    return {"role": role, "content": content}


def parse_chat_record(obj: Any) -> ChatRecord:
    """Normalise one decoded JSON line (ShareGPT ``conversations`` or ``messages``) to a :class:`ChatRecord`.

    Leading assistant turns are dropped: they answer no prompt (ShareGPT dumps often open with a
    greeting from the model), and neither a loss mask nor a regeneration can be built for them.
    Raises ``ValueError`` (without file context) when the object is malformed.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        key, sharegpt = "conversations", True
    elif "messages" in obj:
        key, sharegpt = "messages", False
    else:
        raise ValueError("expected a 'conversations' (ShareGPT) or 'messages' key")
    raw_messages = obj[key]
    if not isinstance(raw_messages, list):
        raise ValueError(f"{key!r} is a {type(raw_messages).__name__}, expected a list")
    messages = [_normalise_message(raw, i, sharegpt) for i, raw in enumerate(raw_messages)]
    first_prompt = next((i for i, m in enumerate(messages) if m["role"] != "assistant"), len(messages))
    messages = messages[first_prompt:]
    if not any(m["role"] == "user" for m in messages):
        raise ValueError(f"{key!r} is empty or has no user turn")
    extra = {k: v for k, v in obj.items() if k != key}
    return ChatRecord(messages=messages, extra=extra)


def read_chat_jsonl(path: str | Path, limit: int | None = None) -> list[ChatRecord]:
    """Read a chat JSONL file in ShareGPT or messages format (formats may be mixed line by line).

    Blank lines are skipped. A malformed line raises :class:`DataFormatError` naming the file, the
    1-based line number and what is wrong: bytes that are not UTF-8, invalid or too deeply nested JSON,
    a string holding a lone surrogate escape (``"\\ud800"``: JSON allows it, but it is no text and no
    tokenizer or UTF-8 writer takes it), or a record of the wrong shape. ``limit`` stops after that many
    records.
    """
    path = Path(path)
    records: list[ChatRecord] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            try:
                records.extend(_parse_line(raw))
            except ValueError as error:
                raise DataFormatError(f"{path}:{line_number}: {error}") from None
    return records


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_line(raw: bytes) -> list[ChatRecord]:
    """The record of one JSONL line (none for a blank line); ``ValueError`` saying what is wrong."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8: byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line") from None
    if not line.strip():
        return []
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    record = parse_chat_record(obj)
    if _SURROGATE_ESCAPE.search(line):  # only an escape can put a surrogate in decoded JSON
        _check_text(record)
    return [record]


def _check_text(record: ChatRecord) -> None:
    """``ValueError`` if any string of ``record`` holds a lone surrogate (it cannot be encoded as UTF-8)."""
    try:
        json.dumps({"messages": record.messages, **record.extra}, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end]
        raise ValueError(f"a string holds the lone surrogate escape \\u{ord(bad[0]):04x}, which is not text") from None


def write_jsonl(path: str | Path, records: Iterable[ChatRecord]) -> int:
    """Write records as messages-format JSONL (``{"messages": [...], **extra}``); returns the count.

    The parent directory is created if needed; the file is written to a temporary name and renamed,
    so an interrupted run never leaves a truncated file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"messages": record.messages, **record.extra}, ensure_ascii=False) + "\n")
            count += 1
    partial.replace(path)
    return count


def default_prompt_path(split: str) -> Path:
    """The shipped prompt set: ``"train"`` (about 89%) or ``"heldout"`` (about 11%), messages JSONL.

    User turns only (plus a few system prompts and multi-turn conversations whose assistant turns
    are placeholders); every line has a ``"category"``. Regenerate it before training on it.
    """
    if split not in PROMPT_SPLITS:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {PROMPT_SPLITS}")
    resource = importlib.resources.files("tandem.speculative") / "prompts" / f"{split}.jsonl"
    return Path(str(resource))


# --------------------------------------------------------------------------------------------
# Tokenisation with a loss mask
# --------------------------------------------------------------------------------------------


def render_ids(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of the chat template's rendering (the template adds its own special tokens)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: Sequence[Message]) -> torch.Tensor:
    """``[1, S]`` int64: the conversation up to its first assistant turn, rendered with the generation
    prompt, ready for decoding (what ``tandem eval`` feeds the target)."""
    first_answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return torch.tensor([render_ids(tokenizer, messages[:first_answer], add_generation_prompt=True)], dtype=torch.long)


def end_of_turn_token_ids(tokenizer) -> set[int]:
    """Ids of the tokens that can close an assistant turn: the eos token plus the usual turn markers."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[token] for token in END_OF_TURN_TOKENS if token in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _check_prefix(prefix: list[int], full: list[int], what: str) -> None:
    if full[: len(prefix)] != prefix:
        mismatch = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
        raise DataFormatError(
            f"chat template is not prefix-stable: the rendering of {what} is not a prefix of the whole "
            f"conversation (first difference at token {mismatch}); loss masks cannot be derived from it"
        )


def assistant_spans(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[tuple[int, int]]]:
    """Render a conversation and locate each assistant turn's tokens.

    Returns ``(input_ids, spans)``: the full rendering's token ids and, per assistant turn,
    ``(start, end)`` token offsets covering its content and end-of-turn token (e.g. ``<|im_end|>``),
    not its role header and not the separator after the end token. Found by rendering the prefix up
    to the turn with a generation prompt (its length is ``start``) and the prefix through the turn
    (its length bounds ``end``); each rendering must be a prefix of the whole, else
    :class:`DataFormatError`.
    """
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    end_ids = end_of_turn_token_ids(tokenizer)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if turn == 0:
            raise DataFormatError("conversation opens with an assistant turn; it answers no prompt")
        before = render_ids(tokenizer, messages[:turn], add_generation_prompt=True)
        through = render_ids(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        _check_prefix(before, full, f"messages[:{turn}] with a generation prompt")
        _check_prefix(through, full, f"messages[:{turn + 1}]")
        start, end = len(before), len(through)
        # Trailing separators after the end-of-turn token belong to the template, not the answer.
        closing = [i for i in range(start, end) if full[i] in end_ids]
        if closing:
            end = closing[-1] + 1
        spans.append((start, end))
    return full, spans


def tokenize_conversation(tokenizer, messages: Sequence[Message],
                          max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise a conversation with the tokenizer's chat template and mark what the draft learns.

    Arguments:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: ``[{"role", "content"}, ...]`` as produced by :func:`read_chat_jsonl`.
        max_seq_len: keep at most this many tokens (the tail is cut).

    Returns:
        ``input_ids``: `[S]` int64, ``S <= max_seq_len``.
        ``loss_mask``: `[S]` int64, 1 on assistant content and its end-of-turn token, 0 on system and
        user turns and on role headers. May be all zero after truncation; callers drop such samples.
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    ids, spans = assistant_spans(tokenizer, messages)
    loss_mask = torch.zeros(len(ids), dtype=torch.long)
    for start, end in spans:
        loss_mask[start:end] = 1
    input_ids = torch.tensor(ids, dtype=torch.long)
    return input_ids[:max_seq_len], loss_mask[:max_seq_len]


class TokenizedChatDataset(Dataset):
    """Map-style dataset of tokenised conversations.

    ``dataset[i]`` is ``{"input_ids": [S_i] int64, "loss_mask": [S_i] int64}``. Build it with
    :meth:`from_records`, which drops (and counts in ``num_dropped``) samples that have no
    assistant token left after truncation.
    """

    def __init__(self, samples: list[dict[str, torch.Tensor]], num_dropped: int = 0):
        self.samples = samples
        self.num_dropped = num_dropped

    @classmethod
    def from_records(
        cls, tokenizer, records: Iterable[ChatRecord | Sequence[Message]], max_seq_len: int
    ) -> "TokenizedChatDataset":
        samples, num_dropped = [], 0
        for record in records:
            messages = record.messages if isinstance(record, ChatRecord) else record
            input_ids, loss_mask = tokenize_conversation(tokenizer, messages, max_seq_len)
            if int(loss_mask.sum()) == 0:
                num_dropped += 1
                continue
            samples.append({"input_ids": input_ids, "loss_mask": loss_mask})
        if num_dropped:
            logger.warning(
                "dropped %d of %d conversations with no assistant tokens within max_seq_len=%d "
                "(unregenerated prompts, or a prompt longer than the limit)",
                num_dropped, num_dropped + len(samples), max_seq_len,
            )
        return cls(samples, num_dropped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]

    def num_loss_tokens(self) -> int:
        """Total number of tokens under the loss mask (what the draft is trained on)."""
        return sum(int(sample["loss_mask"].sum()) for sample in self.samples)


# --------------------------------------------------------------------------------------------
# Batching: padding, deterministic order, sharding
# --------------------------------------------------------------------------------------------


def pad_token_id_for(tokenizer) -> int:
    """The tokenizer's pad token id, else its eos token id (many chat models define no pad token)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("tokenizer has neither a pad token nor an eos token; pass pad_token_id explicitly")


@dataclasses.dataclass(kw_only=True)
class ChatCollator:
    """Right-pads samples into a batch; use as a ``DataLoader`` ``collate_fn``.

    Returns ``{"input_ids", "attention_mask", "loss_mask"}``, each `[B, S]` int64, where ``S`` is the
    longest sample in the batch or ``pad_to`` when set (a fixed shape avoids recompiles and
    allocator churn). Padding positions have ``attention_mask == loss_mask == 0``.
    """

    pad_token_id: int
    """Id written at padding positions (:func:`pad_token_id_for` picks pad, else eos)."""
    pad_to: int | None = None
    """Pad every batch to exactly this length; samples longer than it raise ValueError."""

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        length = longest if self.pad_to is None else self.pad_to
        if longest > length:
            raise ValueError(f"a sample has {longest} tokens, more than pad_to={length}")
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        loss_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            attention_mask[row, :n] = 1
            loss_mask[row, :n] = sample["loss_mask"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def batch_order(
    num_samples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[list[int]]:
    """The batches (lists of sample indices) that ``rank`` sees in ``epoch``; a pure function.

    One permutation per epoch, drawn by a ``torch.Generator`` seeded with ``seed + epoch`` (as
    ``DistributedSampler`` does), is shared by all ranks. The permutation is cut to a multiple of
    ``world_size`` and rank ``r`` takes positions ``r, r + world_size, ...``, so shards are disjoint,
    equally long, and together cover all but at most ``world_size - 1`` samples. Each shard is then
    chunked into batches of ``batch_size`` (the last one shorter unless ``drop_last``).

    Resuming after ``n`` batches of this epoch is ``batch_order(...)[n:]``: the same samples in the
    same order as an uninterrupted run.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    permutation = torch.randperm(num_samples, generator=generator).tolist()
    usable = num_samples - num_samples % world_size
    shard = permutation[rank:usable:world_size]
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class DeterministicBatchSampler(Sampler[list[int]]):
    """A resumable, shardable batch sampler over :func:`batch_order`; pass as ``batch_sampler=``.

    Iterating yields the remaining batches of the current epoch, then advances the epoch. State is
    ``{"epoch", "batches_yielded"}``. Hazard: a ``DataLoader`` with workers pulls batches ahead of
    the training loop, so ``state_dict()`` can run ahead of what was trained on; a recipe that
    counts its own optimizer steps should call :meth:`resume_from_step` on restart instead.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.batches_yielded = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        return batch_order(
            self.num_samples, self.batch_size, self.seed, epoch, self.rank, self.world_size, self.drop_last
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._batches(0))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches(self.epoch)[self.batches_yielded :]:
            self.batches_yielded += 1
            yield batch
        self.epoch += 1
        self.batches_yielded = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_yielded = epoch, 0

    def resume_from_step(self, step: int) -> None:
        """Position the sampler after ``step`` batches counted from epoch 0, batch 0."""
        per_epoch = len(self)
        if per_epoch == 0:
            raise ValueError("the sampler yields no batches; cannot resume")
        self.epoch, self.batches_yielded = divmod(step, per_epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            logger.warning("resuming a sampler saved with seed %s under seed %s", state["seed"], self.seed)
        self.epoch, self.batches_yielded = int(state["epoch"]), int(state["batches_yielded"])


