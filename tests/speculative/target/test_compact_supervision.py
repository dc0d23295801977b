"""Compact supervision: the target's final hidden state instead of fp32 draft-vocabulary probabilities.

The client's expansion must give the full encoding's supervision (probabilities within fp32 rounding,
everything else bit for bit), training on it must give the full encoding's losses within 1e-5 relative,
and the encoding is used only when a client asks for it and the target's logits allow it.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tandem.speculative.target import compact
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.target.supervision import SUPERVISION_KEYS, compute_supervision
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.trainer import train
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data
from tests.speculative.remote.remote_utils import tiny_batch, tiny_vocab_mapping


def supervise_both(target: Eagle3TargetModel, seed: int = 0):
    ids, mask = tiny_vocab_mapping(draft_size=120, seed=seed)
    batch = tiny_batch(batch=3, seq=20, seed=seed)
    full = compute_supervision(target, ids, mask, *batch)
    small = compact.compute_compact_supervision(target, ids, mask, *batch)
    return full, small, compact.draft_lm_head(target.model, ids)


def test_compact_answer_has_the_hidden_state_instead_of_the_probabilities():
    target = Eagle3TargetModel(build_tiny_llama())
    full, small, head = supervise_both(target)
    assert list(small) == compact.COMPACT_SUPERVISION_KEYS
    hidden = small[compact.FINAL_HIDDEN_KEY]
    assert hidden.shape == (3, 20, target.config.hidden_size) and hidden.dtype == torch.float32
    assert torch.equal(hidden[:, -1], torch.zeros_like(hidden[:, -1]))  # shifted with a zero tail, like the logits
    assert head.shape == (120, target.config.hidden_size)


def test_expanded_compact_supervision_equals_the_full_encoding():
    target = Eagle3TargetModel(build_tiny_llama(seed=1))
    full, small, head = supervise_both(target, seed=1)
    expanded = compact.expand_supervision(small, head)
    assert list(expanded) == SUPERVISION_KEYS
    for key in ("aux_hidden_states", "position_mask", "input_ids", "loss_mask"):
        assert expanded[key].dtype == full[key].dtype and torch.equal(expanded[key], full[key]), key
    assert expanded["target_probs"].dtype == torch.float32
    torch.testing.assert_close(expanded["target_probs"], full["target_probs"], rtol=1e-5, atol=1e-7)


def test_position_mask_uses_the_argmax_over_the_full_vocabulary():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]]])
    selected_mask = torch.tensor([True, False, True])
    loss_mask = torch.tensor([[1, 1]])
    # Position 0's argmax (id 1) is outside the draft vocabulary: not scored, though id 2 is the best inside.
    assert compact.draft_position_mask(logits, selected_mask, loss_mask).squeeze(-1).tolist() == [[False, True]]


@pytest.mark.parametrize("change", ["bias", "softcap"])
def test_targets_whose_logits_are_not_linear_in_the_hidden_state_are_refused(change):
    model = build_tiny_llama()
    if change == "bias":
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    else:
        model.config.final_logit_softcapping = 30.0
    assert compact.output_projection(model) is None
    with pytest.raises(ValueError, match="bias-free linear"):
        compact.compute_compact_supervision(Eagle3TargetModel(model), *tiny_vocab_mapping(), *tiny_batch())


def test_compact_is_at_least_3x_smaller_for_llama_8b():
    sizes = compact.bytes_per_token(hidden=4096, draft_vocab=32000, target_itemsize=2)
    assert sizes["full"] / sizes["compact"] >= 3.0


class CompactInProcessTarget(Eagle3TargetModel):
    """The in-process target answering through the compact encoding and the client's expansion."""

    def supervise(self, input_ids, attention_mask, loss_mask):
        small = compact.compute_compact_supervision(
            self, self.selected_token_ids, self.selected_token_mask, input_ids, attention_mask, loss_mask
        )
        return compact.expand_supervision(small, compact.draft_lm_head(self.model, self.selected_token_ids))


def train_losses(tmp_path, name: str, target_model, **overrides) -> list[float]:
    config = TrainConfig(**overrides,
        data=str(write_chat_data(tmp_path / "data.jsonl", count=16, answer_words=10)), output_dir=str(tmp_path / name),
        total_steps=6, batch_size=4, max_seq_len=48, draft_vocab_size=120, warmup_steps=1, ttt_steps=3, save_every=100,
        show_progress=False, learning_rate=3e-3, dtype="float32",
    )
    train(config, target=target_model, tokenizer=build_tiny_tokenizer())
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_training_on_compact_supervision_matches_full_within_1e_5(tmp_path):
    full = train_losses(tmp_path, "full", Eagle3TargetModel(build_tiny_llama(seed=2)))
    small = train_losses(tmp_path, "compact", CompactInProcessTarget(build_tiny_llama(seed=2)))
    assert len(full) == len(small) == 6
    for step, (a, b) in enumerate(zip(full, small)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: full {a} vs compact {b}"


# ---------------------------------------------------------------- negotiation (server logic, no sockets)


def compact_server(model=None):
    from tandem.speculative.remote.server import TargetModelServer

    target = Eagle3TargetModel(model if model is not None else build_tiny_llama())
    server = TargetModelServer(target, nccl_port=0)
    return target, server


def generate_body(seed: int = 0) -> bytes:
    from tandem.speculative.remote import wire

    input_ids, attention_mask, loss_mask = tiny_batch(seed=seed)
    return wire.encode_to_bytes({"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask})


def set_vocab(server, client_id: str = "c") -> torch.Tensor:
    from tandem.speculative.remote import wire

    ids, mask = tiny_vocab_mapping(draft_size=120)
    body = wire.encode_to_bytes({"selected_token_ids": ids, "selected_token_mask": mask})
    server.handle("set_vocab_mapping", body, client_id=client_id)
    return ids


def test_a_client_that_does_not_ask_gets_the_v1_answer_and_no_echo():
    from tandem.speculative.remote import protocol, wire

    _, server = compact_server()
    set_vocab(server)
    reply = server.handle(protocol.EP_GENERATE, generate_body(), client_id="c")
    assert protocol.SUPERVISION_HEADER not in reply.headers
    assert list(wire.decode(b"".join(reply.body))) == SUPERVISION_KEYS


def test_a_client_that_asks_gets_the_compact_answer_echoed_and_the_lm_head_rows():
    from tandem.speculative.remote import protocol, wire

    target, server = compact_server()
    ids = set_vocab(server)
    reply = server.handle(protocol.EP_GENERATE, generate_body(), client_id="c", supervision_encoding="compact")
    assert reply.headers[protocol.SUPERVISION_HEADER] == "compact"
    answer = wire.decode(b"".join(reply.body))
    assert list(answer) == compact.COMPACT_SUPERVISION_KEYS
    head = wire.decode(b"".join(server.handle(protocol.EP_DRAFT_LM_HEAD, b"", client_id="c").body))["weight"]
    assert torch.equal(head, target.model.lm_head.weight[ids])
    full = compute_supervision(target, ids, tiny_vocab_mapping(draft_size=120)[1], *tiny_batch())
    torch.testing.assert_close(compact.expand_supervision(answer, head)["target_probs"], full["target_probs"],
                               rtol=1e-5, atol=1e-7)


def test_a_target_without_exact_compact_form_answers_in_full_and_says_so():
    from tandem.speculative.remote import protocol, wire
    from tandem.speculative.remote.serving.request_checks import RequestError

    model = build_tiny_llama()
    model.config.final_logit_softcapping = 30.0
    _, server = compact_server(model)
    set_vocab(server)
    reply = server.handle(protocol.EP_GENERATE, generate_body(), client_id="c", supervision_encoding="compact")
    assert reply.headers[protocol.SUPERVISION_HEADER] == "full"
    assert list(wire.decode(b"".join(reply.body))) == SUPERVISION_KEYS
    with pytest.raises(RequestError) as info:
        server.handle(protocol.EP_DRAFT_LM_HEAD, b"", client_id="c")
    assert info.value.status == 400


def test_bad_encoding_header_is_400_and_lm_head_before_vocabulary_is_409():
    from tandem.speculative.remote import protocol
    from tandem.speculative.remote.serving.request_checks import RequestError

    _, server = compact_server()
    with pytest.raises(RequestError) as info:
        server.handle(protocol.EP_DRAFT_LM_HEAD, b"", client_id="c")
    assert info.value.status == 409
    set_vocab(server)
    with pytest.raises(RequestError) as info:
        server.handle(protocol.EP_GENERATE, generate_body(), client_id="c", supervision_encoding="tiny")
    assert info.value.status == 400 and "X-Tandem-Supervision" in info.value.message


# ---------------------------------------------------------------- end to end over real HTTP and the data plane


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.speculative.remote.remote_utils import save_tiny_target, start_tiny_server

    root = tmp_path_factory.mktemp("compact_remote")
    target_dir = save_tiny_target(root / "target", seed=3)
    server = start_tiny_server(target_dir, root / "serve.log", nccl_timeout_s=60)
    yield root, target_dir, server
    server.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("data_plane", [False, True], ids=["http", "group"])
def test_remote_compact_supervision_equals_in_process_full(served, data_plane):
    from tandem.speculative.remote.client import RemoteEagle3TargetModel
    from tests.speculative.remote.remote_utils import load_tiny_target

    _, target_dir, server = served
    reference = load_tiny_target(target_dir)
    ids, mask = tiny_vocab_mapping(draft_size=120)
    reference.set_vocab_mapping(ids, mask)
    batch = tiny_batch(batch=2, seq=24, seed=5)
    with RemoteEagle3TargetModel(server.url, supervision_encoding="compact", enable_nccl=data_plane) as client:
        client.set_vocab_mapping(ids, mask)
        got = client.generate_batch(*batch)
        counts = client.transfer_counts
    want = reference.supervise(*batch)
    assert counts["group" if data_plane else "http"] == 1
    assert list(got) == SUPERVISION_KEYS
    for key in ("aux_hidden_states", "position_mask", "input_ids", "loss_mask"):
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(got["target_probs"], want["target_probs"], rtol=1e-5, atol=1e-7)


@pytest.mark.timeout(240)
def test_remote_training_with_compact_supervision_matches_in_process_within_1e_5(served):
    from tandem.speculative.remote.client import RemoteEagle3TargetModel
    from tests.speculative.remote.remote_utils import load_tiny_target

    root, target_dir, server = served
    full = train_losses(root, "in_process", load_tiny_target(target_dir))
    client = RemoteEagle3TargetModel(server.url, supervision_encoding="compact")
    try:
        small = train_losses(root, "remote_compact", client, target=str(target_dir))
    finally:
        client.close()
    assert len(full) == len(small) == 6
    for step, (a, b) in enumerate(zip(full, small)):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: full {a} vs compact {b}"
