"""Prompts the target writes itself (``training/synthetic_prompts.py``): the template's user-turn opening, sampled
continuations kept when new, whole and long enough, reproducible from the seed."""

import pytest

from tandem.speculative.training.synthetic_prompts import synthesize_prompts, user_turn_prefix
from tests.conftest import build_tiny_llama, build_tiny_tokenizer


def test_the_prefix_is_the_template_up_to_the_users_words():
    tokenizer = build_tiny_tokenizer()
    prefix = tokenizer.decode(user_turn_prefix(tokenizer))
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert rendered.startswith(prefix) and rendered[len(prefix):].startswith("hello")
    assert prefix.endswith("user\n")


def test_synthesized_prompts_are_new_distinct_single_user_turns_and_reproducible():
    model, tokenizer = build_tiny_llama(), build_tiny_tokenizer()
    kwargs = dict(batch_size=8, max_tokens=24, min_chars=3, max_batches=3, seed=1)
    first = synthesize_prompts(model, tokenizer, 6, **kwargs)
    assert first == synthesize_prompts(model, tokenizer, 6, **kwargs)
    assert 1 <= len(first) <= 6
    texts = [r.messages[0]["content"] for r in first]
    assert all(len(r.messages) == 1 and r.messages[0]["role"] == "user" for r in first)
    assert all(len(t) >= 3 and t == t.strip() for t in texts)
    assert len({" ".join(t.lower().split()) for t in texts}) == len(texts)
    # A prompt already known is never written again.
    again = synthesize_prompts(model, tokenizer, 6, existing={texts[0].upper()}, **kwargs)
    assert texts[0] not in [r.messages[0]["content"] for r in again]


def test_a_template_that_hides_the_users_words_is_refused():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}\n<|im_end|>\n{% endfor %}"
    with pytest.raises(ValueError, match="verbatim"):
        user_turn_prefix(tokenizer)
