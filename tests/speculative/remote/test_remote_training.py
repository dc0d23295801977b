"""Disaggregated training end to end: a real ``tandem serve-target`` process on loopback and a tiny target.

Remote training gives the very losses and draft weights of the in-process run: with prefetch, with a
second trainer (``tandem train --target-url``, another process) on the same server at the same time,
and across a server crash and restart mid-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RetryPolicy
from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.trainer import train
from tests.conftest import build_tiny_tokenizer
from tests.speculative.remote.remote_utils import restart_on_call, save_tiny_target, start_tiny_server

pytestmark = pytest.mark.timeout(240)

STEPS = 5


def write_chat_data(path: Path, count: int = 16) -> Path:
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 7 + j) % 13) for j in range(10))
            messages = [{"role": "user", "content": f"go {i}"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def run_config(root: Path, name: str, target_dir: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(root / "data.jsonl"), output_dir=str(root / name), target=str(target_dir), total_steps=STEPS,
        batch_size=4, max_seq_len=48, draft_vocab_size=120, warmup_steps=1, ttt_steps=2, save_every=100,
        show_progress=False, learning_rate=3e-3, dtype="float32",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def exported_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "eagle3-draft" / "model.safetensors"))


def assert_same_run(output_dir: Path, reference_dir: Path) -> None:
    assert losses(output_dir) == losses(reference_dir)  # exact float equality, step by step
    got, want = exported_weights(output_dir), exported_weights(reference_dir)
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote_training")
    write_chat_data(root / "data.jsonl")
    return root


@pytest.fixture(scope="module")
def target_dir(root) -> Path:
    return save_tiny_target(root / "target")


@pytest.fixture(scope="module")
def reference(root, target_dir) -> Path:
    """The in-process run every remote run must reproduce bit for bit."""
    trainer = train(run_config(root, "in_process", target_dir), tokenizer=build_tiny_tokenizer())
    assert trainer.step == STEPS
    return Path(trainer.output_dir)


@pytest.fixture(scope="module")
def server(root, target_dir):
    holder = {"process": start_tiny_server(target_dir, root / "serve-target.log")}
    yield holder
    holder["process"].stop()


def test_remote_training_is_bit_identical_to_in_process(root, target_dir, reference, server):
    url = server["process"].url
    trainer = train(run_config(root, "remote", target_dir, target_urls=[url], prefetch_depth=2),
                    tokenizer=build_tiny_tokenizer())
    assert trainer.step == STEPS
    assert_same_run(root / "remote", reference)
    log = server["process"].log_tail(100_000)
    assert "POST /generate" in log and "status=200" in log  # one debug line per request
    assert "disconnected" in log  # train() ended its session; the server is still up
    assert server["process"].proc.poll() is None


def test_two_trainers_share_one_server_and_both_match(root, target_dir, reference, server):
    url = server["process"].url
    cli = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", "--log-level", "WARNING", "train", "--data", str(root / "data.jsonl"),
         "--output-dir", str(root / "cli"), "--target", str(target_dir), "--target-url", url, "--prefetch-depth", "2",
         "--total-steps", str(STEPS), "--batch-size", "4", "--max-seq-len", "48", "--draft-vocab-size", "120",
         "--warmup-steps", "1", "--ttt-steps", "2", "--save-every", "100", "--learning-rate", "3e-3",
         "--dtype", "float32", "--no-show-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    trainer = train(run_config(root, "concurrent", target_dir, target_urls=[url]), tokenizer=build_tiny_tokenizer())
    output, _ = cli.communicate(timeout=180)
    assert cli.returncode == 0, output
    assert trainer.step == STEPS
    assert_same_run(root / "concurrent", reference)
    assert_same_run(root / "cli", reference)


def test_server_crash_and_restart_mid_training_is_retried_through(root, target_dir, reference, server):
    """SIGKILL the server after a few requests, restart it on the same port; the run must not notice."""
    port = server["process"].port
    client = RemoteEagle3TargetModel(
        server["process"].url, prefetch_depth=2, retry=RetryPolicy(max_retries=60, backoff_s=0.1, max_backoff_s=1.0)
    )
    restarted = restart_on_call(client, server, 3, lambda: start_tiny_server(
        target_dir, root / "serve-target-2.log", "--exit-when-idle", port=port))
    trainer = train(run_config(root, "restarted", target_dir), target=client, tokenizer=build_tiny_tokenizer())
    assert restarted.is_set() and trainer.step == STEPS
    assert_same_run(root / "restarted", reference)
    log = server["process"].log_tail(100_000)
    assert "POST /set_vocab_mapping" in log  # the client taught the new server the vocabulary again
    client.close()
    # Started with --exit-when-idle: the last client's /disconnect stops it, with a summary.
    assert server["process"].proc.wait(30) == 0
    assert "served" in server["process"].log_tail() and "supervision" in server["process"].log_tail()


def test_remote_training_is_bit_identical_in_bfloat16(root, target_dir):
    """A bf16 server and a bf16 in-process target (bf16 draft compute, fp32 master weights) train the same draft."""
    reference = train(run_config(root, "in_process_bf16", target_dir, dtype="bfloat16"),
                      tokenizer=build_tiny_tokenizer())
    assert reference.compute_dtype == torch.bfloat16
    server = start_tiny_server(target_dir, root / "serve-target-bf16.log", dtype="bfloat16")
    try:
        remote = train(run_config(root, "remote_bf16", target_dir, dtype="bfloat16", target_urls=[server.url]),
                       tokenizer=build_tiny_tokenizer())
    finally:
        server.stop()
    assert remote.target.dtype == torch.bfloat16 and remote.compute_dtype == torch.bfloat16
    assert_same_run(root / "remote_bf16", root / "in_process_bf16")


def test_live_evaluation_through_the_server_leaves_the_run_bit_identical(root, target_dir, reference):
    # --eval-every decodes held-out prompts through the server's /verify between steps: the measured figures
    # land in metrics.jsonl, and the losses and the draft are those of the run without it, bit for bit.
    server = start_tiny_server(target_dir, root / "serve-target-eval.log")
    try:
        config = run_config(root, "remote_eval", target_dir, target_urls=[server.url], eval_every=2,
                            eval_prompts=str(root / "data.jsonl"), eval_limit=2, eval_max_new_tokens=6,
                            eval_draft_tokens=3)
        train(config, tokenizer=build_tiny_tokenizer())
        log = server.log_tail(100_000)
    finally:
        server.stop()
    assert_same_run(root / "remote_eval", reference)
    rows = [json.loads(line) for line in (root / "remote_eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_acceptance_length" in r] == [2, 4, 5]  # every 2 steps and at the end
    for row in rows:
        if "eval_acceptance_length" in row:
            assert row["eval_outputs_match"] and row["eval_prompts"] == 2 and row["eval_s"] > 0
            assert 1.0 <= row["eval_acceptance_length"] <= 4.0 and 0.0 <= row["eval_step0_accuracy"] <= 1.0
    assert "POST /verify" in log
