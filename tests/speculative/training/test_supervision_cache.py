"""The supervision cache and the target dtype: exact reuse of the target's answers, bf16 against fp32.

A run that fills the cache while it trains, a run that reads a cache filled ahead (in-process or by a real
``tandem serve-target`` through ``tandem cache-supervision``), must train the same draft bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.models import resolve_dtype
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.supervision_cache import SupervisionCache, cache_identity
from tandem.speculative.training.trainer import Trainer
from tests.conftest import REPO_ROOT, build_tiny_tokenizer
from tests.speculative.remote.remote_utils import load_tiny_target, save_tiny_target, start_tiny_server

REPO = REPO_ROOT


def write_chat_data(path: Path, count: int = 12) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 5 + j) % 11) for j in range(8 + i % 5))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("supervision_cache")
    write_chat_data(root / "data.jsonl")
    save_tiny_target(root / "target")
    return root


def config(root: Path, name: str, **overrides) -> TrainConfig:
    # 12 samples, batch 4: 3 steps an epoch, so 7 steps reuse every sample at least twice.
    fields = dict(data=str(root / "data.jsonl"), output_dir=str(root / name), target=str(root / "target"),
                  total_steps=7, batch_size=4, max_seq_len=64, draft_vocab_size=120, warmup_steps=1, ttt_steps=3,
                  save_every=100, show_progress=False, learning_rate=3e-3, dtype="float32")
    fields.update(overrides)
    return TrainConfig(**fields)


def run(root: Path, name: str, target=None, **overrides) -> Trainer:
    trainer = Trainer(config(root, name, **overrides), target=target or load_tiny_target(root / "target"),
                      tokenizer=build_tiny_tokenizer())
    trainer.losses = []
    while trainer.step < trainer.config.total_steps:
        batch = trainer.micro_batch(trainer.step)
        trainer.losses.append(trainer.train_step([batch])["loss"])
    return trainer


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.draft.state_dict().items()}


def assert_same_weights(a: Trainer, b: Trainer) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


def test_training_from_a_filled_cache_equals_filling_it_while_training(root):
    cache = root / "cache-a"
    filling = run(root, "filling", supervision_cache=str(cache))
    # 12 distinct samples were computed once each; the other 16 of 28 sample-visits came from disk.
    assert (filling.supervision_cache.misses, filling.supervision_cache.hits) == (12, 16)
    reading = run(root, "reading", supervision_cache=str(cache))
    assert (reading.supervision_cache.misses, reading.supervision_cache.hits) == (0, 28)
    assert filling.losses == reading.losses
    assert_same_weights(filling, reading)


def test_cache_entries_from_a_server_equal_in_process_ones(root):
    """`tandem cache-supervision --target-url` against a real server writes the same bytes as the in-process fill."""
    local = root / "cache-local"
    trainer = Trainer(config(root, "fill-local", supervision_cache=str(local)),
                      target=load_tiny_target(root / "target"),
                      tokenizer=build_tiny_tokenizer())
    assert trainer.fill_supervision_cache() == (0, 12)
    remote = root / "cache-remote"
    server = start_tiny_server(root / "target", root / "serve.log")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tandem.cli", "--log-level", "WARNING", "cache-supervision",
             "--data", str(root / "data.jsonl"), "--output-dir", str(root / "fill-remote"),
             "--target", str(root / "target"), "--target-url", server.url,
             "--max-seq-len", "64", "--draft-vocab-size", "120",
             "--supervision-cache", str(remote), "--no-show-progress"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "12 samples computed, 0 already there" in out.stdout
    local_files = sorted(p.relative_to(local) for p in local.rglob("*.safetensors"))
    remote_files = sorted(p.relative_to(remote) for p in remote.rglob("*.safetensors"))
    assert len(local_files) == 12 and local_files == remote_files  # same identity directory, same keys
    for rel in local_files:
        assert (local / rel).read_bytes() == (remote / rel).read_bytes(), rel
    # And a run over the server-filled cache trains exactly like one over the in-process-filled cache.
    assert_same_weights(run(root, "from-local", supervision_cache=str(local)),
                        run(root, "from-remote", supervision_cache=str(remote)))


def test_cache_identity_separates_dtypes_and_vocabularies(root):
    target = load_tiny_target(root / "target")
    ids_a, ids_b = torch.arange(100), torch.arange(1, 101)
    dirs = {SupervisionCache(root / "ids", cache_identity(target, ids)).directory for ids in (ids_a, ids_b)}
    bf16 = load_tiny_target(root / "target", dtype="bfloat16")
    dirs.add(SupervisionCache(root / "ids", cache_identity(bf16, ids_a)).directory)
    assert len(dirs) == 3
    assert SupervisionCache(root / "ids", cache_identity(target, ids_a)).directory in dirs  # stable


def test_a_torn_cache_entry_is_recomputed_not_trained_on(root):
    cache = root / "cache-torn"
    first = run(root, "torn-first", supervision_cache=str(cache))
    victim = sorted(cache.rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a killed writer without the atomic rename
    second = run(root, "torn-second", supervision_cache=str(cache))
    assert second.supervision_cache.misses == 1
    assert_same_weights(first, second)


def test_cached_supervision_is_close_to_the_batched_live_answer(root):
    """Per-sample answers differ from padded-batch ones only in floating-point rounding (fp32: ~1e-5)."""
    target = load_tiny_target(root / "target")
    trainer = Trainer(config(root, "close", supervision_cache=str(root / "cache-close")), target=target,
                      tokenizer=build_tiny_tokenizer())
    batch = trainer.micro_batch(0)
    cached = trainer.supervision_for(batch)
    live = target.supervise(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    scored = live["position_mask"].squeeze(-1) & batch["attention_mask"].bool()
    assert torch.equal(cached["position_mask"].squeeze(-1) & scored, live["position_mask"].squeeze(-1) & scored)
    assert torch.equal(cached["input_ids"], live["input_ids"])
    diff = (cached["target_probs"] - live["target_probs"])[scored].abs().max()
    assert diff < 1e-4
    aux_diff = (cached["aux_hidden_states"] - live["aux_hidden_states"])[batch["attention_mask"].bool()].abs().max()
    assert aux_diff < 1e-4


def test_auto_dtype_follows_the_hardware():
    from tandem.models import has_native_bf16

    assert resolve_dtype("auto") == (torch.bfloat16 if has_native_bf16("cpu") else torch.float32)
    assert resolve_dtype("float32") is torch.float32 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")


def test_bf16_mixed_precision_training_tracks_float32(root):
    """bf16 target + bf16 draft compute with fp32 master weights: the losses follow the fp32 run within 3 %."""
    fp32 = run(root, "fp32")
    bf16 = run(root, "bf16", target=load_tiny_target(root / "target", dtype="bfloat16"), dtype="bfloat16")
    assert bf16.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.draft.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in bf16.optimizer.state.values())
    relative = [abs(a - b) / abs(a) for a, b in zip(fp32.losses, bf16.losses)]
    assert max(relative) < 0.03, relative
    assert bf16.losses[-1] < bf16.losses[0]  # and it learns
