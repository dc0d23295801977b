"""Tiny training runs shared by the training, decoding and remote tests: a peaked target, a run config, a fit."""

import torch

from tandem.speculative.decoding.decode import greedy_decode
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.eagle3_loss import ttt_loss
from tandem.speculative.training.vocab import build_draft_vocab
from tests.conftest import build_tiny_llama, write_chat_data


def peaked_target(seed: int = 0) -> Eagle3TargetModel:
    """A tiny random target whose next-token distributions are peaked, so there is something to learn."""
    model = build_tiny_llama(seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return Eagle3TargetModel(model, aux_layer_ids=[0, 1, 2])


def tiny_run_config(tmp_path, **overrides) -> TrainConfig:
    fields = dict(data=str(write_chat_data(tmp_path / "data.jsonl")), output_dir=str(tmp_path / "out"), total_steps=8,
                  batch_size=4, max_seq_len=64, draft_vocab_size=120, warmup_steps=2, ttt_steps=3, save_every=4,
                  show_progress=False, learning_rate=3e-3, dtype="float32")
    fields.update(overrides)
    return TrainConfig(**fields)


def on_own_continuations(num_prompts: int, new_tokens: int):
    """A peaked tiny target, random prompts, the supervision of its own greedy continuations of them, and a
    fresh draft whose vocabulary comes from those tokens: ``(target, draft, prompts, supervision, mask)``."""
    target = peaked_target(seed=5)
    prompts = [torch.randint(3, 250, (1, 6)) for _ in range(num_prompts)]
    continuations = [torch.tensor([greedy_decode(target, p, new_tokens).tokens]) for p in prompts]
    ids = torch.cat([torch.cat([p, c], 1) for p, c in zip(prompts, continuations)])
    mask = torch.ones_like(ids)
    vocab = build_draft_vocab(torch.bincount(ids.flatten(), minlength=320), 320)
    target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 320))
    draft.seed_from_target(target.get_input_embeddings(), vocab.selected_token_ids, seed_lm_head=True)
    return target, draft, prompts, target.supervise(ids, mask, mask), mask


def fit(draft, supervision, mask, steps: int, ttt_steps: int) -> None:
    """``steps`` AdamW steps of the TTT loss on one batch."""
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=3e-3)
    draft.train()
    for _ in range(steps):
        loss = ttt_loss(draft, supervision, mask, ttt_steps=ttt_steps).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
