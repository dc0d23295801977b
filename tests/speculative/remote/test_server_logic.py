"""TargetModelServer's request logic without sockets: routing, auth, limits, sessions, every 4xx."""

from __future__ import annotations

import struct

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.server import TargetModelServer
from tandem.speculative.remote.serving.request_checks import RequestError
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.target.supervision import compute_supervision
from tests.speculative.remote.remote_utils import assert_same_supervision, tiny_batch, tiny_vocab_mapping


@pytest.fixture()
def target(tiny_llama):
    return Eagle3TargetModel(tiny_llama)


@pytest.fixture()
def logic(target):
    return TargetModelServer(target, nccl_port=0, token="s3cret", max_body_bytes=4096)


def vocab_body(ids=None, mask=None) -> bytes:
    default_ids, default_mask = tiny_vocab_mapping()
    ids = default_ids if ids is None else ids
    mask = default_mask if mask is None else mask
    return wire.encode_to_bytes({"selected_token_ids": ids, "selected_token_mask": mask})


def generate_body(**overrides) -> bytes:
    input_ids, attention_mask, loss_mask = tiny_batch()
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    tensors.update(overrides)
    return wire.encode_to_bytes({k: v for k, v in tensors.items() if v is not ...})


def status_of(fn, *args, **kwargs) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value.status, info.value.message


def test_generate_is_compute_supervision_bit_for_bit(logic, target):
    ids, mask = tiny_vocab_mapping()
    logic.handle_set_vocab_mapping(vocab_body(), client_id="a")
    body, used_nccl = logic.handle_generate(generate_body(), client_wants_nccl=True, client_id="a")
    assert used_nccl is False  # the process-group data plane is not there yet: the wire answer
    expected = compute_supervision(target, ids, mask, *tiny_batch())
    got = wire.decode(bytearray(body))
    assert_same_supervision(got, {k: expected[k] for k in protocol.SUPERVISION_KEYS})


def test_generate_before_set_vocab_mapping_is_409(logic):
    status, message = status_of(logic.handle_generate, generate_body(), False, client_id="fresh")
    assert status == 409 and "set_vocab_mapping" in message


def test_each_client_session_keeps_its_own_vocabulary(logic, target):
    small_ids, small_mask = tiny_vocab_mapping(draft_size=50, seed=1)
    logic.handle_set_vocab_mapping(vocab_body(), client_id="a")
    logic.handle_set_vocab_mapping(vocab_body(small_ids, small_mask), client_id="b")
    a = wire.decode(logic.handle_generate(generate_body(), False, client_id="a")[0])
    b = wire.decode(logic.handle_generate(generate_body(), False, client_id="b")[0])
    assert a["target_probs"].shape[-1] == 200 and b["target_probs"].shape[-1] == 50
    logic.handle_disconnect(b"{}", client_id="b")
    assert logic.session_ids == ["a"]
    assert status_of(logic.handle_generate, generate_body(), False, client_id="b")[0] == 409


def test_disconnect_ends_the_session_not_the_server(logic):
    logic.handle("heartbeat", b"", client_id="a")
    logic.handle("disconnect", b"{}", client_id="a")
    assert not logic.shutdown_event.is_set()


def test_exit_when_idle_stops_after_the_last_client_leaves(target):
    logic = TargetModelServer(target, nccl_port=0, exit_when_idle=True)
    logic.handle("heartbeat", b"", client_id="a")
    logic.handle("heartbeat", b"", client_id="b")
    logic.handle("disconnect", b"{}", client_id="a")
    assert not logic.shutdown_event.is_set()
    logic.handle("disconnect", b"{}", client_id="b")
    assert logic.shutdown_event.is_set()


@pytest.mark.parametrize(
    "header,ok",
    [(None, False), ("Bearer wrong", False), ("Basic s3cret", False), ("Bearer s3cret", True),
     ("Bearer s3cret ", True)],
)
def test_bearer_token_is_required_except_for_health(logic, header, ok):
    logic.authorize("health", header)  # public, whatever the header
    if ok:
        logic.authorize("generate", header)
    else:
        assert status_of(logic.authorize, "generate", header)[0] == 401


def test_routes_unknown_paths_to_404_and_wrong_methods_to_405(logic):
    assert logic.route("POST", "/generate") == "generate"
    assert logic.route("GET", "/health?probe=1") == "health"
    assert status_of(logic.route, "POST", "/nope")[0] == 404
    assert status_of(logic.route, "GET", "/generate")[0] == 405
    assert status_of(logic.route, "POST", "/health")[0] == 405


def test_body_over_the_limit_is_413(logic):
    logic.check_body_size(4096)
    status, message = status_of(logic.check_body_size, 4097)
    assert status == 413 and "4097" in message


BAD_GENERATE = {
    "malformed wire": (b"garbage", "bad magic"),
    "missing loss_mask": (generate_body(loss_mask=...), "missing ['loss_mask']"),
    "unexpected key": (generate_body(extra=torch.zeros(1)), "entry 'extra' at offset"),
    "1-D input_ids": (generate_body(input_ids=torch.zeros(4, dtype=torch.long)), "[B, S]"),
    "float input_ids": (generate_body(input_ids=torch.zeros(2, 16)), "integer"),
    "ids out of range": (generate_body(input_ids=torch.full((2, 16), 320)), "[0, 320)"),
    "negative ids": (generate_body(input_ids=torch.full((2, 16), -1)), "[0, 320)"),
    "mask shape": (generate_body(attention_mask=torch.ones(2, 15, dtype=torch.long)), "attention_mask shape"),
    "float mask": (generate_body(loss_mask=torch.ones(2, 16)), "loss_mask must be an integer"),
    "trailing garbage": (generate_body() + b"\x00", "trailing garbage"),
}


@pytest.mark.parametrize("name", sorted(BAD_GENERATE))
def test_malformed_generate_is_400_naming_the_problem(logic, name):
    logic.handle_set_vocab_mapping(vocab_body(), client_id="a")
    body, fragment = BAD_GENERATE[name]
    status, message = status_of(logic.handle, "generate", body, client_id="a")
    assert status == 400
    assert fragment in message


def _mask(indices, size=320):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


BAD_VOCAB = {
    "mask wrong size": (vocab_body(mask=torch.ones(100, dtype=torch.bool)), "bool [320]"),
    "mask not bool": (vocab_body(mask=torch.ones(320, dtype=torch.uint8)), "bool [320]"),
    "ids out of range": (vocab_body(ids=torch.tensor([1, 400]), mask=_mask([1])), "[0, 320)"),
    "duplicate ids": (vocab_body(ids=torch.tensor([1, 1]), mask=_mask([1, 2])), "indicator"),
    "mask disagrees": (vocab_body(ids=torch.tensor([1, 2]), mask=_mask([1, 3])), "indicator"),
    "empty ids": (vocab_body(ids=torch.zeros(0, dtype=torch.long), mask=_mask([])), "non-empty"),
    "bad magic": (struct.pack("<I", 0) + vocab_body()[4:], "bad magic"),
}


@pytest.mark.parametrize("name", sorted(BAD_VOCAB))
def test_malformed_vocab_mapping_is_400(logic, name):
    body, fragment = BAD_VOCAB[name]
    status, message = status_of(logic.handle, "set_vocab_mapping", body, client_id="a")
    assert status == 400 and fragment in message


def test_init_nccl_answers_disabled_and_refuses_bad_json(logic):
    reply = logic.handle("init_nccl", protocol.encode_json({"nccl_port": 1234}))
    assert protocol.decode_json(b"".join(reply.body)) == {"status": "disabled"}
    assert status_of(logic.handle, "init_nccl", b"{nope")[0] == 400


def test_an_internal_failure_is_500_and_the_next_request_works(logic, target, monkeypatch):
    logic.handle_set_vocab_mapping(vocab_body(), client_id="a")
    original = target.generate_batch
    monkeypatch.setattr(target, "generate_batch", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    status, message = status_of(logic.handle, "generate", generate_body(), client_id="a")
    assert status == 500 and "boom" in message
    monkeypatch.setattr(target, "generate_batch", original)
    assert logic.handle("generate", generate_body(), client_id="a").content_type == protocol.WIRE_CONTENT_TYPE


def test_model_info_and_embeddings_match_the_target(logic, target):
    info = protocol.decode_json(logic.handle_model_info(b""))
    assert {k: info[k] for k in target.model_info()} == target.model_info()
    assert info["dtype"] == "float32"
    weight = wire.decode(logic.handle_input_embeddings(b""))["weight"]
    assert torch.equal(weight, target.get_input_embeddings())


def test_summary_counts_requests_errors_and_batches(logic):
    logic.handle_set_vocab_mapping(vocab_body(), client_id="a")
    logic.handle("generate", generate_body(), client_id="a")
    logic.record(200, 10, 20)
    logic.record(400, 5, 7)
    summary = logic.summary()
    assert "2 requests (1 errors, 1 batches)" in summary
