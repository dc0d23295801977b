"""The client trusts no server: rows 5-7 of issue 24's red team, against small real servers on 127.0.0.1.

- row 5: a server whose ``/verify`` answers token ids outside the vocabulary (or negative): ``tandem eval``
  ends with one line naming the server, not an ``IndexError`` deep in the draft;
- row 6: a server that accepts the connection and never answers (``/model_info`` or ``/verify``);
- row 7: a server that drips its ``/verify`` (or ``/generate``) answer a byte at a time.

Rows 6 and 7 end within the request deadline (``--request-timeout-s`` of ``tandem eval`` and ``tandem
train``), with a message that says what the server did; a slow but honest server that answers within it is
served as usual.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tandem.cli import main
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.export.eagle3 import export_draft
from tandem.speculative.remote import wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RemoteTargetError
from tests.conftest import write_chat_data
from tests.speculative.remote.hostile_servers import SilentServer, TamperingProxy
from tests.speculative.remote.remote_utils import load_tiny_target, save_tiny_target, start_tiny_server

pytestmark = pytest.mark.timeout(240)

DEADLINE_S = 3.0


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("untrusted_server")
    save_tiny_target(root / "target")
    write_chat_data(root / "prompts.jsonl", count=2)
    target = load_tiny_target(root / "target")
    torch.manual_seed(0)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(target.config, 320))
    export_draft(draft, root / "draft", aux_layer_ids=target.aux_layer_ids)
    return root


@pytest.fixture(scope="module")
def server(root):
    process = start_tiny_server(root / "target", root / "serve-target.log")
    yield process
    process.stop()


def eval_against(root: Path, url: str, *extra: str) -> int:
    return main(["--log-level", "WARNING", "eval", "--draft", str(root / "draft"), "--target-url", url,
                 "--tokenizer", str(root / "target"), "--prompts", str(root / "prompts.jsonl"), "--limit", "2",
                 "--max-new-tokens", "6", "--dtype", "float32", *extra])


def train_against(root: Path, url: str, tmp_path: Path, *extra: str) -> int:
    return main(["--log-level", "WARNING", "train", "--data", str(root / "prompts.jsonl"), "--output-dir",
                 str(tmp_path / "run"), "--tokenizer", str(root / "target"), "--target-url", url,
                 "--total-steps", "2", "--batch-size", "1", "--max-seq-len", "32", "--draft-vocab-size", "100",
                 "--ttt-steps", "1", "--no-show-progress", "--request-timeout-s", str(DEADLINE_S), *extra])


def error_line(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0]
    return errors[0]


def with_next_ids(value: int):
    """A ``/verify`` answer rewritten so that its first next token is ``value``."""
    def rewrite(body: bytes) -> bytes:
        tensors = {k: v.clone() for k, v in wire.decode(bytearray(body)).items()}
        tensors["next_token_ids"][0, 0] = value
        return wire.encode_to_bytes(tensors)
    return rewrite


@pytest.mark.parametrize("value", [320 + 5, -1])
def test_row5_token_ids_outside_the_vocabulary_end_eval_with_one_line_naming_the_server(root, server, value, caplog):
    proxy = TamperingProxy(server.url, ("/verify",), rewrite=with_next_ids(value))
    try:
        assert eval_against(root, proxy.url) == 2
    finally:
        proxy.close()
    line = error_line(caplog)
    assert proxy.url in line and "/verify" in line and "next_token_ids" in line and "[0, 320)" in line, line


def test_row5_generate_answers_with_ids_outside_the_vocabulary_are_refused(server):
    def rewrite(body: bytes) -> bytes:
        tensors = {k: v.clone() for k, v in wire.decode(bytearray(body)).items()}
        tensors["input_ids"][0, 0] = 10_000
        return wire.encode_to_bytes(tensors)

    proxy = TamperingProxy(server.url, ("/generate",), rewrite=rewrite)
    try:
        with RemoteEagle3TargetModel(proxy.url, enable_nccl=False) as client:
            ids = torch.randint(3, 250, (1, 8))
            client.set_vocab_mapping(torch.arange(320), torch.ones(320, dtype=torch.bool))
            with pytest.raises(RemoteTargetError, match=r"'input_ids'.*\[0, 320\)"):
                client.supervise(ids, torch.ones_like(ids), torch.ones_like(ids))
    finally:
        proxy.close()


def test_row6_a_server_that_never_answers_is_given_up_at_the_deadline_naming_what_it_did(root, caplog, tmp_path):
    silent = SilentServer()
    try:
        started = time.monotonic()
        with pytest.raises(RemoteTargetError) as caught:
            RemoteEagle3TargetModel(silent.url, enable_nccl=False, timeout_s=DEADLINE_S).model_info()
        assert time.monotonic() - started < DEADLINE_S + 2
        assert silent.url in str(caught.value) and "sent nothing" in str(caught.value)
        # tandem eval and tandem train end the same way: exit 2, one line, within the deadline
        started = time.monotonic()
        assert eval_against(root, silent.url, "--request-timeout-s", str(DEADLINE_S)) == 2
        assert time.monotonic() - started < DEADLINE_S + 10
        assert silent.url in error_line(caplog) and "sent nothing" in error_line(caplog)
        caplog.clear()
        started = time.monotonic()
        assert train_against(root, silent.url, tmp_path) == 2
        assert time.monotonic() - started < DEADLINE_S + 10
        assert silent.url in error_line(caplog) and "/model_info" in error_line(caplog)
    finally:
        silent.close()


def test_row6_a_verify_that_never_comes_ends_eval_at_the_deadline(root, server, caplog):
    proxy = TamperingProxy(server.url, ("/verify",), silent=True)
    try:
        started = time.monotonic()
        assert eval_against(root, proxy.url, "--request-timeout-s", str(DEADLINE_S)) == 2
        assert time.monotonic() - started < DEADLINE_S + 15
    finally:
        proxy.close()
    line = error_line(caplog)
    assert proxy.url in line and "/verify" in line and "sent nothing" in line, line


def test_row7_a_dripping_verify_answer_ends_eval_at_the_deadline(root, server, caplog):
    proxy = TamperingProxy(server.url, ("/verify",), drip_s=0.05)
    try:
        started = time.monotonic()
        assert eval_against(root, proxy.url, "--request-timeout-s", str(DEADLINE_S)) == 2
        assert time.monotonic() - started < DEADLINE_S + 15
    finally:
        proxy.close()
    line = error_line(caplog)
    assert proxy.url in line and "/verify" in line and "still sending" in line, line


def test_row7_a_dripping_generate_answer_ends_train_at_the_deadline(root, server, caplog, tmp_path):
    proxy = TamperingProxy(server.url, ("/generate",), drip_s=0.05)
    try:
        started = time.monotonic()
        assert train_against(root, proxy.url, tmp_path) == 2
        assert time.monotonic() - started < DEADLINE_S + 20
    finally:
        proxy.close()
    line = error_line(caplog)
    assert proxy.url in line and "/generate" in line and "still sending" in line, line


def test_a_slow_but_honest_server_within_the_deadline_is_served(server):
    proxy = TamperingProxy(server.url, ("/model_info",), delay_s=1.0)
    try:
        with RemoteEagle3TargetModel(proxy.url, enable_nccl=False, timeout_s=DEADLINE_S) as client:
            assert client.model_info()["vocab_size"] == 320
    finally:
        proxy.close()
    assert proxy.tampered >= 1
