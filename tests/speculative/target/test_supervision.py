"""Draft vocabulary ordering and mappings; the supervision formulas."""

import torch

from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.target.supervision import SUPERVISION_KEYS, compute_supervision, compute_target_distribution
from tandem.speculative.training.vocab import build_draft_vocab, count_tokens, load_draft_vocab, save_draft_vocab
from tests.conftest import build_tiny_llama


def test_vocab_order_specials_then_frequency_then_lowest_unused():
    counts = torch.tensor([0, 5, 3, 3, 0, 9, 0, 0, 1, 0])
    vocab = build_draft_vocab(counts, draft_vocab_size=8, special_token_ids=[7, 0])
    # specials ascending, then 5 (9), 1 (5), 2 and 3 (3, lower id first), 8 (1), then lowest unused: 4
    assert vocab.selected_token_ids.tolist() == [0, 7, 5, 1, 2, 3, 8, 4]
    assert vocab.d2t.tolist() == [0, 6, 3, -2, -2, -2, 2, -3]
    assert torch.equal(vocab.selected_token_ids, torch.arange(8) + vocab.d2t)
    assert vocab.t2d.tolist() == [True, True, True, True, True, True, False, True, True, False]


def test_vocab_truncates_frequency_list_and_identity_when_large():
    counts = torch.tensor([4, 3, 2, 1])
    assert build_draft_vocab(counts, 2).selected_token_ids.tolist() == [0, 1]
    identity = build_draft_vocab(counts, 10)
    assert identity.selected_token_ids.tolist() == [0, 1, 2, 3] and bool(identity.t2d.all())


def test_count_tokens_only_under_loss_mask():
    samples = [(torch.tensor([1, 2, 2, 3]), torch.tensor([0, 1, 1, 0])), (torch.tensor([3, 3]), torch.tensor([1, 1]))]
    assert count_tokens(samples, 5).tolist() == [0, 0, 2, 2, 0]


def test_vocab_cache_round_trip_and_staleness(tmp_path):
    vocab = build_draft_vocab(torch.tensor([0, 2, 1, 0]), 3)
    path = tmp_path / "vocab.safetensors"
    save_draft_vocab(vocab, path, fingerprint="abc")
    loaded = load_draft_vocab(path, "abc")
    assert torch.equal(loaded.selected_token_ids, vocab.selected_token_ids)
    assert torch.equal(loaded.selected_token_mask, vocab.selected_token_mask)
    assert load_draft_vocab(path, "other") is None
    assert load_draft_vocab(tmp_path / "missing.safetensors") is None


def test_target_distribution_against_direct_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 12)
    selected = torch.tensor([3, 0, 7, 11, 5])
    mask = torch.zeros(12, dtype=torch.bool)
    mask[selected] = True
    loss_mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    probs, position_mask = compute_target_distribution(logits, selected, mask, loss_mask)
    assert probs.dtype == torch.float32 and probs.shape == (2, 5, 5)
    assert position_mask.dtype == torch.bool and position_mask.shape == (2, 5, 1)
    for b in range(2):
        for s in range(5):
            row = logits[b, s]
            expected = torch.exp(row[selected]) / torch.exp(row[selected]).sum()
            torch.testing.assert_close(probs[b, s], expected)
            in_vocab = int(row.argmax()) in selected.tolist()
            assert bool(position_mask[b, s, 0]) == (in_vocab and bool(loss_mask[b, s]))


def test_compute_supervision_keys_shapes_and_dtypes():
    model = build_tiny_llama()
    target = Eagle3TargetModel(model, aux_layer_ids=[0, 1, 2])
    vocab = build_draft_vocab(torch.arange(320), 50)
    ids = torch.randint(3, 250, (2, 6))
    sup = compute_supervision(target, vocab.selected_token_ids, vocab.selected_token_mask, ids,
                              torch.ones_like(ids), torch.ones_like(ids))
    assert list(sup) == SUPERVISION_KEYS
    assert sup["aux_hidden_states"].shape == (2, 6, 192)
    assert sup["target_probs"].shape == (2, 6, 50) and sup["target_probs"].dtype == torch.float32
    assert sup["position_mask"].shape == (2, 6, 1) and sup["position_mask"].dtype == torch.bool
    assert not bool(sup["position_mask"][:, -1].any())  # the zero tail is never trained
    target.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    again = target.supervise(ids, torch.ones_like(ids), torch.ones_like(ids))
    for key in SUPERVISION_KEYS:
        assert torch.equal(again[key], sup[key])
