"""``tandem train --data`` with image conversations for a vision-language target (a tiny random Qwen2.5-VL).

The data's images (tiny PNGs written here) come in the forms VLM data uses (content parts, ``image_url``
parts, LLaMA-Factory's ``images`` with ``<image>`` markers, SpecForge's and LLaVA's ``image``); the CLI trains from
them in-process and against a real loopback ``serve-target``; an image's positions are never trained; the
remote supervision of an image batch is the in-process one, bit for bit; the supervision cache keys a sample by
its images too; images for a text-only target, a missing image and an unreadable one are refused in one line
(exit 2).
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from tandem.cli import main
from tandem.speculative.target.vision import image_token_types
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.data import DataFormatError, read_chat_jsonl
from tandem.speculative.training.image_patches import row_images
from tandem.speculative.training.image_records import IMAGE_MARKER
from tandem.speculative.training.supervision_cache import sample_key
from tandem.speculative.training.target_factory import build_target
from tandem.speculative.training.trainer import Trainer
from tests.conftest import save_tiny_target
from tests.speculative.remote.remote_utils import assert_same_supervision, start_tiny_server
from tests.speculative.target_families import IMAGE_TOKEN_ID, build_family_target, build_vision_tokenizer

pytestmark = pytest.mark.timeout(300)


def _png(path, seed: int, size=(56, 56)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def _conversations(root) -> list[dict]:
    """Eight lines: every image form, two images in one line, a wide image, and two text-only lines."""
    for i in range(4):
        _png(root / "img" / f"{i}.png", seed=i)
    _png(root / "img" / "wide.png", seed=9, size=(112, 56))
    answer = [" ".join(str((i * 7 + j) % 13) for j in range(10)) for i in range(8)]
    return [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                                    {"type": "text", "text": "what is this"}]},
                      {"role": "assistant", "content": answer[0]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "and this? "},
                                                    {"type": "image_url",
                                                     "image_url": {"url": str(root / "img" / "1.png")}}]},
                      {"role": "assistant", "content": [{"type": "text", "text": answer[1]}]}]},
        {"conversations": [{"from": "human", "value": "<image>\ncompare with <image>"},
                           {"from": "gpt", "value": answer[2]}], "images": ["img/2.png", "img/3.png"]},
        {"conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": answer[3]}],
         "image": "img/wide.png"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/3.png"},
                                                    {"type": "text", "text": "again"}]},
                      {"role": "assistant", "content": answer[4]}]},
        {"conversations": [{"from": "human", "value": "<image>tell me"}, {"from": "gpt", "value": answer[5]}],
         "images": ["img/1.png"]},
        {"messages": [{"role": "user", "content": "no picture here"}, {"role": "assistant", "content": answer[6]}]},
        {"messages": [{"role": "user", "content": "nor here"}, {"role": "assistant", "content": answer[7]}]},
    ]


def _write(path, lines: list[dict]):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A saved tiny Qwen2.5-VL with its tokenizer and a PIL image processor (56 x 56 to 112 x 112 pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = tmp_path_factory.mktemp("vlm") / "target"
    build_family_target("qwen2_5_vl", seed=2).save_pretrained(directory)
    build_vision_tokenizer().save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _write(root / "chat.jsonl", _conversations(root))


def _config(data_path, out, **overrides) -> TrainConfig:
    fields = dict(data=str(data_path), output_dir=str(out), total_steps=6, batch_size=4, max_seq_len=96,
                  draft_vocab_size=120, warmup_steps=1, ttt_steps=2, save_every=6, show_progress=False,
                  learning_rate=1e-2, dtype="float32", aux_layer_ids=[0, 2, 3])
    fields.update(overrides)
    return TrainConfig(**fields)


def _cli(data_path, out, *extra) -> int:
    return main(["train", "--data", str(data_path), "--output-dir", str(out), "--total-steps", "6",
                 "--save-every", "6", "--batch-size", "4", "--max-seq-len", "96", "--draft-vocab-size", "120",
                 "--ttt-steps", "2", "--warmup-steps", "1", "--learning-rate", "1e-2", "--dtype", "float32",
                 "--no-show-progress", *extra])


def test_every_image_form_is_read_with_its_images_resolved_and_placed(data):
    records = read_chat_jsonl(data)
    images = [[p.rsplit("/", 1)[-1] for p in r.images] for r in records]
    assert images == [["0.png"], ["1.png"], ["2.png", "3.png"], ["wide.png"], ["3.png"], ["1.png"], [], []]
    for record in records:
        markers = sum(m["content"].count(IMAGE_MARKER) for m in record.messages)
        assert markers == len(record.images) and all(p.startswith("/") for p in record.images)
    assert records[0].messages[0]["content"] == "<image>what is this"  # content parts, in their order
    assert records[1].messages[1]["content"] == records[1].messages[1]["content"].strip()  # a text-part answer
    assert records[3].messages[0]["content"] == "<image>describe"  # no marker: the first user turn's start


@pytest.mark.parametrize("line, says", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "gone.png"}]},
                   {"role": "assistant", "content": "x"}]}, "image 'gone.png' not found"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/b.png"}}]},
                   {"role": "assistant", "content": "x"}]}, "is a URL: tandem fetches nothing"),
    ({"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
      "images": ["a.png"]}, "1 images for 2 <image> markers"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}, {"role": "assistant", "content": "x"}]},
     "expected 'text', 'image' or 'image_url'"),
])
def test_bad_image_lines_are_refused_naming_the_line(tmp_path, line, says):
    _png(tmp_path / "a.png", 0)
    path = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "ok"}]}, line])
    with pytest.raises(DataFormatError, match=f"bad.jsonl:2: .*{says}"):
        read_chat_jsonl(path)


def test_tandem_train_trains_from_image_conversations_in_process(vlm_dir, data, tmp_path):
    out = tmp_path / "out"
    assert _cli(data, out, "--target", str(vlm_dir), "--aux-layer-ids", "0", "2", "3") == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert (out / "eagle3-draft" / "model.safetensors").is_file()


def test_image_positions_are_context_and_never_trained(vlm_dir, data, tmp_path):
    trainer = Trainer(_config(data, tmp_path / "out", target=str(vlm_dir)), target_factory=build_target,
                      tokenizer=build_vision_tokenizer())
    with_images = [s for s in trainer.dataset.samples if s.get("images")]
    assert len(with_images) == 6 and len(trainer.dataset) == 8
    sizes = [int((s["input_ids"] == IMAGE_TOKEN_ID).sum()) for s in with_images]
    assert sizes == [4, 4, 8, 8, 4, 4]  # 4 positions a 56 x 56 image, 8 the 112 x 56 one (the same twice: 2, 3)
    for index in range(2):
        batch = trainer.micro_batch(index)
        supervision = trainer.supervision_for(batch)
        image = batch["input_ids"] == IMAGE_TOKEN_ID
        trained = torch.cat([torch.zeros_like(batch["loss_mask"][:, :1]), supervision["loss_mask"][:, :-1]], 1)
        assert int(image.sum()) > 0 and not bool(trained[image].any())  # never trained on an image position
        assert bool(trained[~image].any())
        assert int(batch["image_grid_thw"].prod(1).sum()) == batch["pixel_values"].shape[0]
        # The draft turns with the target's M-RoPE positions, as SGLang and vLLM give them to it.
        positions, real = trainer.draft_positions(batch), batch["attention_mask"].bool()
        want, _ = trainer.target.model.model.get_rope_index(batch["input_ids"], image_token_types(
            batch["input_ids"], IMAGE_TOKEN_ID), batch["image_grid_thw"], attention_mask=batch["attention_mask"])
        assert positions.shape == (3, *image.shape) and torch.equal(positions[:, real], want[:, real])
        assert not torch.equal(positions[0], positions[1])  # an image's height and width are not its time


def test_remote_supervision_of_an_image_batch_equals_the_in_process_one_and_the_cli_trains(vlm_dir, data,
                                                                                          tmp_path):
    server = start_tiny_server(vlm_dir, tmp_path / "serve-target.log")
    try:
        # The server captures its default layers (a remote run cannot choose them): so does the reference.
        local = Trainer(_config(data, tmp_path / "local", target=str(vlm_dir), aux_layer_ids=None),
                        target_factory=build_target)
        remote = Trainer(_config(data, tmp_path / "remote", target_urls=[server.url], tokenizer=str(vlm_dir),
                                 aux_layer_ids=None), target_factory=build_target)
        try:
            assert local.model_info == remote.model_info
            for index in range(2):
                batch = local.micro_batch(index)
                assert batch.get("pixel_values") is not None
                assert_same_supervision(remote.supervision_for(batch), local.supervision_for(batch))
        finally:
            remote.target.close()
        # The CLI, prefetching its requests: the images travel with them (without, the same ids would get
        # another answer and the run would not be the in-process one, loss for loss).
        assert _cli(data, tmp_path / "cli", "--target-url", server.url, "--tokenizer", str(vlm_dir)) == 0
        assert _cli(data, tmp_path / "cli-local", "--target", str(vlm_dir)) == 0
        runs = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("cli", "cli-local")]
        assert len(runs[0]) == 6 and all(math.isfinite(x) for x in runs[0])
        assert runs[0] == runs[1], runs
    finally:
        server.stop()


def test_the_supervision_cache_keys_an_image_sample_by_its_images(vlm_dir, data, tmp_path):
    config = _config(data, tmp_path / "out", target=str(vlm_dir), supervision_cache=str(tmp_path / "cache"))
    trainer = Trainer(config, target_factory=build_target)
    assert trainer.fill_supervision_cache() == (0, 8)
    assert trainer.fill_supervision_cache() == (8, 8)  # the second pass reads every entry back
    sample = next(s for s in trainer.dataset.samples if s.get("images"))
    own = trainer.images.patches(sample["images"])
    other = trainer.images.patches([p for s in trainer.dataset.samples for p in s.get("images", ())
                                    if p not in sample["images"]][:1])
    keys = {sample_key(sample["input_ids"], sample["loss_mask"], patches) for patches in (own, other, None)}
    assert len(keys) == 3  # another image (same size, same ids) or none: another entry
    batch = trainer.micro_batch(0)
    cached = trainer.supervision_for(batch)
    for row, patches in enumerate(row_images(batch)):  # each row's entry is that sample alone, with its images
        n = int(batch["attention_mask"][row].sum())
        ids, mask = batch["input_ids"][row, :n], batch["loss_mask"][row, :n]
        entry = trainer.supervision_cache.entry(trainer.target, ids, mask, patches)
        torch.testing.assert_close(cached["aux_hidden_states"][row, :n], entry["aux_hidden_states"], rtol=0, atol=0)


@pytest.mark.parametrize("case, says", [
    ("text-only target", "is not a vision-language model: it takes text only"),
    ("missing image", "not found"),
    ("unreadable image", "is unreadable"),
])
def test_refusals_are_one_line_and_exit_2(vlm_dir, tmp_path, caplog, case, says):
    lines = _conversations(tmp_path)
    target = vlm_dir
    if case == "text-only target":
        target = save_tiny_target(tmp_path / "text-target")
    elif case == "missing image":
        (tmp_path / "img" / "2.png").unlink()
    else:
        (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data_path = _write(tmp_path / "chat.jsonl", lines)
    with caplog.at_level(logging.ERROR, logger="tandem.cli"):
        assert _cli(data_path, tmp_path / "out", "--target", str(target)) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and says in errors[0] and "\n" not in errors[0], errors
    assert "chat.jsonl:" in errors[0]  # names the line
