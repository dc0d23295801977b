"""A DFlash session over a real ``tandem serve-target``: it declares its method and layers, the server captures
exactly those in the same forward, and the answer equals the in-process one bit for bit, over the HTTP body and
over the process-group data plane; bad declarations get 400; /verify captures the declared layers too."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from tandem.models import load_target
from tandem.speculative.remote import protocol
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.target.model import Eagle3TargetModel
from tests.speculative.remote.remote_utils import (
    assert_same_supervision,
    save_tiny_target,
    start_tiny_server,
    tiny_batch,
)

pytestmark = pytest.mark.timeout(180)
LAYERS = [0, 2]  # the tiny target's 4 layers: DFlash's default for a 2-layer draft (the formula repeats layer 1)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("dflash_remote") / "target")


@pytest.fixture(scope="module")
def reference(target_dir) -> Eagle3TargetModel:
    model, _ = load_target(str(target_dir), dtype="float32")
    target = Eagle3TargetModel(model, draft_method="dflash", num_draft_layers=2)
    target.set_vocab_mapping(torch.arange(model.config.vocab_size), torch.ones(model.config.vocab_size, dtype=bool))
    return target


@pytest.fixture(scope="module")
def server(target_dir):
    process = start_tiny_server(target_dir, target_dir.parent / "serve.log", nccl_timeout_s=5)
    yield process
    process.stop()


def dflash_client(url: str, vocab_size: int, **kwargs) -> RemoteEagle3TargetModel:
    client = RemoteEagle3TargetModel(url, draft_method="dflash", num_draft_layers=2, **kwargs)
    client.set_vocab_mapping(torch.arange(vocab_size), torch.ones(vocab_size, dtype=torch.bool))
    return client


def test_remote_dflash_supervision_is_bit_identical_on_both_data_planes(server, reference):
    assert reference.aux_layer_ids == LAYERS
    vocab = reference.config.vocab_size
    expected = [reference.supervise_compact(*tiny_batch(seed=i)) for i in range(2)]
    assert expected[0]["aux_hidden_states"].shape[-1] == len(LAYERS) * reference.config.hidden_size
    for enable_nccl in (False, True):
        with dflash_client(server.url, vocab, enable_nccl=enable_nccl, nccl_timeout_s=5) as client:
            assert client.model_info()["aux_layer_ids"] == LAYERS and client.identity()["aux_layer_ids"] == LAYERS
            for i in range(2):
                assert_same_supervision(client.generate_batch(*tiny_batch(seed=i)), expected[i])
            assert_same_supervision(client.supervise_compact(*tiny_batch(seed=0)), expected[0])
            counts = client.transfer_counts
            assert counts["group" if enable_nccl else "http"] >= 2, counts
    # The EAGLE-3 session of a client of the original design (no header) still gets the server's three layers.
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as plain:
        plain.set_vocab_mapping(torch.arange(vocab), torch.ones(vocab, dtype=torch.bool))
        assert plain.generate_batch(*tiny_batch())["aux_hidden_states"].shape[-1] == 3 * reference.config.hidden_size


def test_verify_captures_the_declared_layers(server, reference):
    ids = tiny_batch(batch=1, seq=9)[0]
    with dflash_client(server.url, reference.config.vocab_size, enable_nccl=False) as client:
        session = client.decode_session(layer_ids=LAYERS)
        first = session.extend(ids[:, :5])
        second = session.extend(ids[:, 5:])
    cache = DynamicCache()
    local = [reference.greedy_forward(ids[:, :5], cache, layer_ids=LAYERS),
             reference.greedy_forward(ids[:, 5:], cache, layer_ids=LAYERS)]
    for got, want in zip((first, second), local):
        assert got.aux_hidden_states.shape[-1] == len(LAYERS) * reference.config.hidden_size
        assert torch.equal(got.aux_hidden_states, want.aux_hidden_states)
        assert torch.equal(got.next_token_ids, want.next_token_ids)


@pytest.mark.parametrize("value, message", [
    ("dflash:3", "last layer"), ("medusa:1", "unknown draft method"), ("dflash:1,x", "METHOD:ID"),
    ("eagle3:0,1", "three distinct"),
])
def test_bad_capture_declarations_get_400_naming_the_problem(server, value, message):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/verify", body=b"", headers={protocol.CAPTURE_HEADER: value})
        answer = connection.getresponse()
        body = answer.read().decode()
    finally:
        connection.close()
    assert answer.status == 400 and message in body and protocol.CAPTURE_HEADER in body, body


def test_model_info_names_the_methods_a_session_may_declare(server):
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as client:
        assert client._model_info()[protocol.DRAFT_METHODS_FIELD] == ["eagle3", "dflash"]


def test_dflash_training_through_the_server_is_bit_identical_to_in_process(server, target_dir, tmp_path):
    from tandem.speculative.training.config import TrainConfig
    from tandem.speculative.training.dflash_trainer import DFlashTrainer
    from tandem.speculative.training.trainer import train
    from tests.conftest import build_tiny_tokenizer, write_chat_data

    data = write_chat_data(tmp_path / "data.jsonl")
    runs = {}
    for name, urls in (("in_process", []), ("remote", [server.url])):
        config = TrainConfig(method="dflash", data=str(data), output_dir=str(tmp_path / name), target=str(target_dir),
                             target_urls=urls, total_steps=3, batch_size=2, max_seq_len=48, warmup_steps=1,
                             save_every=0, show_progress=False, dtype="float32", draft_layers=2, block_size=4,
                             num_anchors=6, prefetch_depth=2)
        runs[name] = train(config, tokenizer=build_tiny_tokenizer(), trainer_class=DFlashTrainer)
    for (key, a), b in zip(runs["in_process"].draft.state_dict().items(), runs["remote"].draft.state_dict().values()):
        assert torch.equal(a, b), key
    assert runs["remote"].record["target"]["aux_layer_ids"] == LAYERS
