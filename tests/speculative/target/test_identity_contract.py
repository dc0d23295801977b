"""The supervision contract: a draft is trained, resumed, evaluated and exported against one target only.

The target's identity (name, weights digest, dtype, sizes, aux layers, tokenizer digest) is in
``/model_info`` as fields a version-1 peer ignores; the training client checks it at connect and on every
new connection (a server restarted with another model stops the run, naming both); servers of one run
must agree; checkpoints and exported drafts record it, and ``--resume``, ``tandem eval`` and
``tandem export`` refuse another target unless ``--allow-target-mismatch`` accepts it on purpose.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tandem.cli import main
from tandem.models import load_target
from tandem.speculative.export.eagle3 import EXPORT_DIRNAME, read_export_record
from tandem.speculative.remote import protocol
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RetryPolicy
from tandem.speculative.remote.server import TargetModelServer
from tandem.speculative.target import identity
from tandem.speculative.target.identity import TargetMismatchError
from tandem.speculative.target.model import Eagle3TargetModel
from tandem.speculative.training.trainer import Trainer, train
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, write_chat_data
from tests.speculative.remote.remote_utils import restart_on_call, save_tiny_target, start_tiny_server
from tests.speculative.tiny_runs import tiny_run_config

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- identity itself

def test_weights_digest_ignores_the_serving_precision_but_not_the_weights():
    model = build_tiny_llama(seed=0)
    as_bf16 = build_tiny_llama(seed=0).to(torch.bfloat16)
    assert identity.weights_digest(model) == identity.weights_digest(as_bf16)
    assert identity.weights_digest(model) != identity.weights_digest(build_tiny_llama(seed=1))
    with torch.no_grad():
        as_bf16.model.norm.weight[0] += 1.0  # one value changed
    assert identity.weights_digest(model) != identity.weights_digest(as_bf16)


def test_tokenizer_digest_sees_an_added_token():
    tokenizer = build_tiny_tokenizer()
    assert identity.tokenizer_digest(tokenizer) == identity.tokenizer_digest(build_tiny_tokenizer())
    tokenizer.add_tokens(["<extra>"])
    assert identity.tokenizer_digest(tokenizer) != identity.tokenizer_digest(build_tiny_tokenizer())


def test_a_mismatch_names_the_fields_and_both_targets(caplog):
    first = identity.target_identity(build_tiny_llama(seed=0), [0, 1, 2], name="first-target")
    second = identity.target_identity(build_tiny_llama(seed=1), [0, 1, 2], name="second-target")
    assert identity.mismatched_fields(first, {**first, "name": "elsewhere"}) == []  # the name is only a label
    with pytest.raises(TargetMismatchError) as error:
        identity.check_same_target(first, second, what="test")
    message = str(error.value)
    assert "weights_digest" in message and "first-target" in message and "second-target" in message
    assert "--allow-target-mismatch" in message
    with caplog.at_level(logging.WARNING):
        assert identity.check_same_target(first, second, what="test", allow=True) == ["weights_digest"]
    assert "accepted" in caplog.text
    assert identity.mismatched_fields(first, {**first, "aux_layer_ids": [0, 1, 3]}) == ["aux_layer_ids"]


def test_model_info_carries_the_identity_as_fields_a_v1_client_ignores():
    model = build_tiny_llama(seed=0)
    target = Eagle3TargetModel(model, [0, 1, 2])
    info = protocol.decode_json(TargetModelServer(target, nccl_port=0).handle_model_info(b""))
    assert {k: info[k] for k in target.model_info()} == target.model_info()  # version 1 unchanged
    assert info["weights_digest"] == identity.weights_digest(model) and info["dtype"] == "float32"
    assert info["architectures"] == ["LlamaForCausalLM"] and info["aux_layer_ids"] == [0, 1, 2]


# ---------------------------------------------------------------- remote: servers and restarts

@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    write_chat_data(root / "data.jsonl", count=16)
    return {"root": root, "a": save_tiny_target(root / "target-a", seed=0),
            "b": save_tiny_target(root / "target-b", seed=1)}


def test_servers_of_one_run_must_serve_the_same_target(targets):
    root = targets["root"]
    first, second = (start_tiny_server(targets[k], root / f"agree-{k}.log") for k in ("a", "b"))
    try:
        client = RemoteEagle3TargetModel([first.url, second.url], enable_nccl=False)
        with pytest.raises(TargetMismatchError, match="weights_digest") as error:
            client.model_info()
        assert str(targets["a"]) in str(error.value) and str(targets["b"]) in str(error.value)
        client.close()
    finally:
        first.stop()
        second.stop()


def test_a_server_restarted_with_another_model_mid_run_stops_the_run(targets):
    root = targets["root"]
    holder = {"process": start_tiny_server(targets["a"], root / "before.log")}
    port = holder["process"].port
    client = RemoteEagle3TargetModel(holder["process"].url, prefetch_depth=2, enable_nccl=False,
                                     retry=RetryPolicy(max_retries=60, backoff_s=0.1, max_backoff_s=1.0))
    restarted = restart_on_call(client, holder, 3,
                                lambda: start_tiny_server(targets["b"], root / "after.log", port=port))
    config = tiny_run_config(root / "restarted", data=str(root / "data.jsonl"), target=str(targets["a"]),
                             total_steps=8, save_every=100)
    try:
        with pytest.raises(TargetMismatchError) as error:
            train(config, target=client, tokenizer=build_tiny_tokenizer())
        message = str(error.value)
        assert restarted.is_set() and "changed during the run" in message and "weights_digest" in message
        assert str(targets["a"]) in message and str(targets["b"]) in message  # both identities named
        metrics = (root / "restarted" / "out" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) < 8  # the run stopped; it did not train on the other model's supervision
    finally:
        client.close()
        holder["process"].stop()


# ---------------------------------------------------------------- resume, eval and export

def _trainer(root: Path, seed: int, **overrides) -> Trainer:
    target = Eagle3TargetModel(build_tiny_llama(seed=seed), [0, 1, 2])
    config = tiny_run_config(root, total_steps=4, save_every=2, **overrides)
    return Trainer(config, target=target, tokenizer=build_tiny_tokenizer())


def test_resume_refuses_another_target_unless_allowed(tmp_path):
    _trainer(tmp_path, seed=0, stop_at_step=2).train()
    with pytest.raises(TargetMismatchError, match="--resume: the run differs in target.weights_digest"):
        _trainer(tmp_path, seed=1, resume=True).train()
    resumed = _trainer(tmp_path, seed=1, resume=True, allow_target_mismatch=True)
    resumed.train()
    assert resumed.step == 4


def test_resume_refuses_other_aux_layers(tmp_path):
    _trainer(tmp_path, seed=0, stop_at_step=2).train()
    other = Trainer(tiny_run_config(tmp_path, total_steps=4, save_every=2, resume=True),
                    target=Eagle3TargetModel(build_tiny_llama(seed=0), [0, 2, 1]),
                    tokenizer=build_tiny_tokenizer())
    with pytest.raises(TargetMismatchError, match="aux_layer_ids"):
        other.train()


def test_training_refuses_a_tokenizer_other_than_the_targets(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    remote_like = Eagle3TargetModel(build_tiny_llama(seed=0), [0, 1, 2])
    served = identity.target_identity(remote_like.model, [0, 1, 2], tokenizer=build_tiny_tokenizer())
    remote_like.identity = lambda: served  # what a server reports: its own tokenizer's digest
    with pytest.raises(TargetMismatchError, match="tokenizer_digest"):
        Trainer(tiny_run_config(tmp_path), target=remote_like, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exported(targets) -> Path:
    """A draft trained in-process against target a, exported with its record."""
    root = targets["root"]
    model, tokenizer = load_target(str(targets["a"]))
    trainer = Trainer(tiny_run_config(root / "export-run", total_steps=1, save_every=1),
                      target=Eagle3TargetModel(model, [0, 1, 2]), tokenizer=tokenizer)
    trainer.train()
    return trainer.output_dir / EXPORT_DIRNAME


def test_the_exported_draft_records_target_aux_layers_and_vocabulary(exported, targets):
    record = read_export_record(exported)
    model, tokenizer = load_target(str(targets["a"]))
    assert record["target"]["weights_digest"] == identity.weights_digest(model)
    assert record["target"]["tokenizer_digest"] == identity.tokenizer_digest(tokenizer)
    assert record["aux_layer_ids"] == [0, 1, 2] and len(record["vocab_digest"]) == 64


def test_eval_refuses_another_target_unless_allowed(exported, targets, caplog):
    prompts = write_chat_data(targets["root"] / "prompts.jsonl", count=2)
    args = ["--log-level", "WARNING", "eval", "--draft", str(exported), "--prompts", str(prompts), "--limit", "2",
            "--max-new-tokens", "4", "--draft-tokens", "2"]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--model", str(targets["b"])]) == 2
    assert "differs in weights_digest" in caplog.text and "--allow-target-mismatch" in caplog.text
    assert main([*args, "--model", str(targets["b"]), "--allow-target-mismatch"]) == 0
    assert main([*args, "--model", str(targets["a"])]) == 0


def test_export_refuses_another_target_unless_allowed(exported, targets, caplog):
    out = targets["root"] / "re-exported"
    args = ["--log-level", "WARNING", "export", "--draft", str(exported), "--format", "speculators", "--output",
            str(out)]
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--model", str(targets["b"])]) == 2
    assert "differs in weights_digest" in caplog.text and not out.exists()
    assert main([*args, "--model", str(targets["a"])]) == 0
    verifier = json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]
    assert verifier["name_or_path"] == str(targets["a"])
    assert read_export_record(out) == read_export_record(exported)  # the record travels with the draft


def test_the_supervision_cache_keeps_models_of_one_shape_apart(tmp_path):
    # model_info and dtype alone cannot tell two models of the same shape apart; the weights digest does.
    from tandem.speculative.training.supervision_cache import SupervisionCache, cache_identity

    ids = torch.arange(120)
    directories = set()
    for seed in (0, 1):
        target = Eagle3TargetModel(build_tiny_llama(seed=seed), [0, 1, 2])
        cached_for = cache_identity(target, ids, identity.identity_of(target))
        directories.add(SupervisionCache(tmp_path, cached_for).directory)
    assert len(directories) == 2
