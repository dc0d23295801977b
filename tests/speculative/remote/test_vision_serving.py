"""A vision-language target behind a real ``tandem serve-target``: a conversation with an image travels as the
image processor's patches beside its token ids, and the answer is the in-process target's, bit for bit."""

from __future__ import annotations

import http.client

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.target.vision import tokenize_image_conversation
from tests.speculative.remote.remote_utils import assert_same_supervision, load_tiny_target, start_tiny_server
from tests.speculative.target.test_vision_target import CONVERSATION, MERGE, _patches
from tests.speculative.target_families import IMAGE_TOKEN_ID, build_family_target, build_vision_tokenizer

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vlm") / "target"
    build_family_target("qwen2_5_vl", seed=2).save_pretrained(directory)
    build_vision_tokenizer().save_pretrained(directory)
    server = start_tiny_server(directory, directory.parent / "serve-target.log")
    yield directory, server
    server.stop()


def _raw_generate(server, tensors: dict) -> tuple[int, str]:
    body = b"".join(bytes(b) for b in wire.encode(tensors))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/generate", body=body, headers={"Content-Type": protocol.WIRE_CONTENT_TYPE,
                                                              protocol.CLIENT_ID_HEADER: "raw-vision"})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_an_image_conversation_through_the_server_equals_the_in_process_supervision(served):
    directory, server = served
    local = load_tiny_target(directory)
    pixels, grid = _patches(5)
    ids, loss_mask = tokenize_image_conversation(build_vision_tokenizer(), CONVERSATION, grid, IMAGE_TOKEN_ID, MERGE)
    batch = (ids[None], torch.ones_like(ids)[None], loss_mask[None])
    selected = torch.arange(0, 320, 2)
    mask = torch.zeros(320, dtype=torch.bool)
    mask[selected] = True
    local.set_vocab_mapping(selected, mask)
    with local.with_images(pixels, grid):
        want = local.supervise(*batch)
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        remote.set_vocab_mapping(selected, mask)
        with remote.with_images(pixels, grid):
            got = remote.supervise(*batch)
        without = remote.supervise(*batch)  # the same ids, no image: another answer
    assert_same_supervision(got, want)
    assert not torch.equal(without["aux_hidden_states"], want["aux_hidden_states"])


@pytest.mark.parametrize("change, says", [
    (lambda t: t.pop("image_grid_thw"), "both pixel_values and image_grid_thw"),
    (lambda t: t.update(pixel_values=t["pixel_values"][:-4]), "patches"),
    (lambda t: t["input_ids"].masked_fill_(t["input_ids"] == IMAGE_TOKEN_ID, 65), "0 image tokens"),
    (lambda t: t.update(pixel_values=t["pixel_values"].long()), "2-D float"),
])
def test_bad_image_requests_get_a_clear_400(served, change, says):
    _directory, server = served
    pixels, grid = _patches(5)
    ids, loss_mask = tokenize_image_conversation(build_vision_tokenizer(), CONVERSATION, grid, IMAGE_TOKEN_ID, MERGE)
    tensors = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "loss_mask": loss_mask[None],
               "pixel_values": pixels, "image_grid_thw": grid}
    change(tensors)
    status, body = _raw_generate(server, tensors)
    assert status == 400 and says in body, body
