"""Speculative decoding through a real ``tandem serve-target`` process: the ``/verify`` extension.

The decoder of ``decode.py`` runs unchanged against the server (``RemoteEagle3TargetModel.decode_session``):
its output equals the target's own greedy decoding token for token, and because the server's answers are the
in-process target's, bit for bit, even the number of target forwards and drafted tokens agree. The server's
KV caches are bounded and freed, a client whose cache was lost recovers by itself, and bad requests get 4xx.
"""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest
import torch

from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
from tandem.speculative.drafts.eagle3 import Eagle3DraftConfig, Eagle3DraftModel
from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.training.vocab import build_draft_vocab
from tests.conftest import build_tiny_llama, build_tiny_tokenizer
from tests.speculative.remote.remote_utils import load_tiny_target, start_tiny_server
from tests.speculative.tiny_runs import fit

pytestmark = pytest.mark.timeout(240)

MAX_DECODE_TOKENS = 96


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    """A tiny target with peaked next-token distributions (a draft can learn them), saved as an HF directory."""
    directory = tmp_path_factory.mktemp("verify") / "target"
    model = build_tiny_llama(seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(target_dir):
    process = start_tiny_server(target_dir, target_dir.parent / "serve-target.log", "--max-decode-tokens",
                                str(MAX_DECODE_TOKENS))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def local(target_dir):
    return load_tiny_target(target_dir)


@pytest.fixture(scope="module")
def trained_draft(local):
    """A draft fitted to the target's own greedy continuations, so that decoding accepts some proposals."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, 250, (1, 6)) for _ in range(6)]
    ids = torch.cat([torch.cat([p, torch.tensor([greedy_decode(local, p, 30).tokens])], 1) for p in prompts])
    mask = torch.ones_like(ids)
    vocab = build_draft_vocab(torch.bincount(ids.flatten(), minlength=320), 320)
    local.set_vocab_mapping(vocab.selected_token_ids, vocab.selected_token_mask)
    draft = Eagle3DraftModel(Eagle3DraftConfig.from_target_config(local.config, 320))
    draft.seed_from_target(local.get_input_embeddings(), vocab.selected_token_ids, seed_lm_head=True)
    fit(draft, local.supervise(ids, mask, mask), mask, steps=40, ttt_steps=3)
    return draft.eval(), prompts


def test_speculative_decoding_through_the_server_equals_greedy_and_the_in_process_decode(server, local, trained_draft):
    draft, prompts = trained_draft
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        accepted_any = False
        for prompt in prompts[:3] + [torch.randint(3, 250, (1, 1))]:
            greedy = greedy_decode(local, prompt, 30)
            assert greedy_decode(remote, prompt, 30).tokens == greedy.tokens
            for draft_tokens in (1, 4):
                here = speculative_decode(local, draft, prompt, 30, draft_tokens)
                there = speculative_decode(remote, draft, prompt, 30, draft_tokens)
                assert there.tokens == greedy.tokens
                # The server answers what the in-process target computes: the same rounds, the same proposals.
                assert (there.target_forwards, there.drafted) == (here.target_forwards, here.drafted)
                accepted_any |= there.target_forwards < len(there.tokens)
        assert accepted_any  # some rounds accepted proposals: the crop after a partial acceptance was exercised
    assert "POST /verify" in server.log_tail(200_000)


def test_stateless_verify_of_a_batch_equals_the_in_process_forward(server, local):
    ids = torch.randint(3, 250, (3, 9))
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        info = remote._model_info()
        assert protocol.EP_VERIFY in info[protocol.EXTENSIONS_FIELD]  # /model_info advertises the extension
        step = remote.verify(ids)
    want = local.decode_session().extend(ids)  # the same batch in one forward (batching changes the rounding)
    assert torch.equal(step.next_token_ids, want.next_token_ids)
    assert torch.equal(step.aux_hidden_states, want.aux_hidden_states)
    assert torch.equal(step.near_ties, want.near_ties)


def test_a_lost_cache_is_sent_again_and_the_decode_goes_on(server, local):
    # Another sequence of the same client takes the server's cache (one a client); the first session is told
    # 409 at its next call and sends its whole sequence again: the answer is the target's on that whole sequence
    # (one forward of 9 positions, which may round differently from 7 then 2: the same tokens here).
    prompt, more = torch.randint(3, 250, (1, 7)), torch.tensor([[11, 12]])
    incremental = local.decode_session()
    incremental.extend(prompt)
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        first, second = remote.decode_session(), remote.decode_session()
        first.extend(prompt)
        second.extend(torch.randint(3, 250, (1, 5)))
        got = first.extend(more)
        assert first.resent == 1 and first.length == 9
        whole = local.decode_session().extend(torch.cat([prompt, more], 1))
        assert torch.equal(got.aux_hidden_states, whole.aux_hidden_states[:, -2:])
        assert torch.equal(got.next_token_ids, whole.next_token_ids[:, -2:])
        assert torch.equal(got.next_token_ids, incremental.extend(more).next_token_ids)
        assert first.extend(torch.tensor([[13]])).next_token_ids.shape == (1, 1) and first.resent == 1  # cached again


def _raw_verify(server, ids: torch.Tensor, headers: dict, extra: dict | None = None) -> tuple[int, str]:
    body = b"".join(bytes(b) for b in wire.encode({"input_ids": ids, **(extra or {})}))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/verify", body=body, headers={"Content-Type": protocol.WIRE_CONTENT_TYPE,
                                                            protocol.CLIENT_ID_HEADER: "raw-client", **headers})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


@pytest.mark.parametrize("ids, headers, status, says", [
    (torch.randint(3, 250, (2, 4)), {protocol.DECODE_SESSION_HEADER: "s"}, 400, "one sequence"),
    (torch.randint(3, 250, (1, 4)), {protocol.PAST_HEADER: "3"}, 400, "without"),
    (torch.randint(3, 250, (1, 4)), {protocol.DECODE_SESSION_HEADER: "s", protocol.PAST_HEADER: "-1"}, 400,
     "non-negative"),
    (torch.randint(3, 250, (1, 4)), {protocol.DECODE_SESSION_HEADER: "bad name!"}, 400, protocol.DECODE_SESSION_HEADER),
    (torch.full((1, 4), 10_000), {}, 400, "must lie in"),
    (torch.rand(1, 4), {}, 400, "integer"),
    (torch.randint(3, 250, (1, 4)), {protocol.DECODE_SESSION_HEADER: "never-seen", protocol.PAST_HEADER: "5"}, 409,
     "send the whole sequence"),
    (torch.randint(3, 250, (1, MAX_DECODE_TOKENS + 1)), {protocol.DECODE_SESSION_HEADER: "s"}, 413,
     "--max-decode-tokens"),
])
def test_bad_verify_requests_get_a_clear_4xx_and_the_server_goes_on(server, ids, headers, status, says):
    got, body = _raw_verify(server, ids, headers)
    assert got == status and says in body, body
    assert _raw_verify(server, torch.randint(3, 250, (1, 3)), {})[0] == 200  # still serving


def test_tree_decoding_through_the_server_equals_greedy_and_the_in_process_decode(server, local, trained_draft):
    from tandem.speculative.decoding.tree import TreeShape

    draft, prompts = trained_draft
    shape = TreeShape(depth=3, top_k=3, size=6)
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        accepted_deep = False
        for prompt in prompts[:3]:
            here = speculative_decode(local, draft, prompt, 30, tree=shape)
            there = speculative_decode(remote, draft, prompt, 30, tree=shape)
            assert there.tokens == here.tokens == greedy_decode(local, prompt, 30).tokens
            assert (there.target_forwards, there.drafted) == (here.target_forwards, here.drafted)
            accepted_deep |= len(there.tokens) >= 2 * there.target_forwards
        assert accepted_deep  # rounds kept branches of two or more nodes: X-Tandem-Keep-Branch was exercised


def test_a_tree_whose_cache_was_lost_is_sent_whole_and_answers_the_same(server, local):
    from tandem.speculative.decoding.tree import DraftTree

    prompt = torch.randint(3, 250, (1, 7))
    tree = DraftTree(tokens=[11, 20, 21, 30], parents=[-1, 0, 0, 2], depths=[0, 1, 1, 2])
    here = local.decode_session()
    here.extend(prompt)
    want = here.extend(torch.tensor([tree.tokens]), tree.parents)
    here.keep_branch(7, [0, 2, 3])
    want_next = here.extend(torch.tensor([[40]]))
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        first, second = remote.decode_session(), remote.decode_session()
        first.extend(prompt)
        second.extend(torch.randint(3, 250, (1, 5)))  # takes the client's one cache
        got = first.extend(torch.tensor([tree.tokens]), tree.parents)
        assert first.resent == 1
        assert torch.equal(got.next_token_ids, want.next_token_ids)
        first.keep_branch(7, [0, 2, 3])
        second.extend(torch.randint(3, 250, (1, 5)))  # and again, with the branch not yet kept on the server
        got_next = first.extend(torch.tensor([[40]]))
        assert first.resent == 2 and first.length == 11
        assert torch.equal(got_next.next_token_ids, want_next.next_token_ids)


@pytest.mark.parametrize("extra, headers, status, says", [
    ({"tree_parents": torch.tensor([0, 0, 1, 2])}, {}, 400, "-1 for the first"),
    ({"tree_parents": torch.tensor([-1, 0, 3, 1])}, {}, 400, "earlier position"),
    ({"tree_parents": torch.tensor([-1, 0, 1])}, {}, 400, "integer [4]"),
    ({"tree_parents": torch.tensor([-1.0, 0.0, 1.0, 2.0])}, {}, 400, "integer [4]"),
    ({}, {protocol.KEEP_BRANCH_HEADER: "3:0,1"}, 400, "without"),
    ({}, {protocol.DECODE_SESSION_HEADER: "s", protocol.KEEP_BRANCH_HEADER: "0,1"}, 400, "BASE:i,j"),
    ({}, {protocol.DECODE_SESSION_HEADER: "s", protocol.KEEP_BRANCH_HEADER: "2:1,1"}, 400, "must increase"),
])
def test_bad_tree_requests_get_a_clear_400(server, extra, headers, status, says):
    got, body = _raw_verify(server, torch.randint(3, 250, (1, 4)), headers, extra)
    assert got == status and says in body, body
    assert _raw_verify(server, torch.randint(3, 250, (1, 3)), {})[0] == 200  # still serving


def test_keeping_a_branch_of_no_cached_tree_is_409(server):
    session = {protocol.DECODE_SESSION_HEADER: "chain-only"}
    assert _raw_verify(server, torch.randint(3, 250, (1, 6)), {**session, protocol.PAST_HEADER: "0"})[0] == 200
    got, body = _raw_verify(server, torch.randint(3, 250, (1, 1)),
                            {**session, protocol.PAST_HEADER: "5", protocol.KEEP_BRANCH_HEADER: "3:0,2"})
    assert got == 409 and "no draft tree" in body, body


def test_decode_caches_are_bounded_and_freed_on_disconnect(local):
    # The request logic alone (no sockets): the caches of several clients never hold more than the budget, and
    # a client's cache goes with its /disconnect.
    from tandem.speculative.remote.server import TargetModelServer

    logic = TargetModelServer(local, nccl_port=0, max_decode_tokens=40)
    body = bytearray(b"".join(bytes(b) for b in wire.encode({"input_ids": torch.randint(3, 250, (1, 15))})))
    for client in ("a", "b", "c"):
        logic.handle(protocol.EP_VERIFY, body, client_id=client, decode_session="s", past="0")
        assert logic.decode_caches.tokens <= 40
    assert len(logic.decode_caches) == 2  # a's was evicted to make room for c's
    logic.handle(protocol.EP_DISCONNECT, b"{}", client_id="c")
    assert len(logic.decode_caches) == 1 and logic.decode_caches.tokens == 15


def test_eval_command_against_a_server_reports_what_the_in_process_eval_does(server, target_dir, trained_draft,
                                                                             tmp_path, capsys):
    # `tandem eval --target-url`: no target weights loaded here, the same table as `tandem eval --model`.
    import json

    from tandem.cli import main
    from tandem.speculative.export.eagle3 import export_draft
    from tests.conftest import write_chat_data

    draft, _ = trained_draft
    export_draft(draft, tmp_path / "draft", aux_layer_ids=[0, 1, 2])
    prompts = write_chat_data(tmp_path / "prompts.jsonl", count=3)
    common = ["--draft", str(tmp_path / "draft"), "--prompts", str(prompts), "--limit", "3", "--max-new-tokens", "12",
              "--draft-tokens", "3", "--step0-accuracy", "--dtype", "float32"]
    reports = []
    for where in (["--model", str(target_dir)], ["--target-url", server.url, "--tokenizer", str(target_dir)]):
        assert main(["--log-level", "WARNING", "eval", *common, *where]) == 0
        out = capsys.readouterr().out
        reports.append(json.loads(out[out.index("{"):]))
    local, remote = reports
    assert remote["target_url"] == server.url and remote["outputs_match"] and remote["prompts"] == 3
    for key in ("acceptance_length", "step0_accuracy", "new_tokens"):
        assert remote[key] == local[key], key


def test_decoding_through_two_gloo_ranks_equals_greedy_chain_and_tree(target_dir, local, trained_draft, tmp_path):
    """``/verify`` under tensor parallelism: each rank keeps its shard of every decode cache, replays rank 0's crops
    and kept branches on it, and runs each decoding forward; greedy, chain and tree decoding through the server give
    the single-process greedy tokens (a peaked target: no near-tie for the shards' summation order to flip)."""
    from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
    from tandem.speculative.decoding.tree import TreeShape

    draft, prompts = trained_draft
    server = start_tiny_server(target_dir, tmp_path / "serve-target.log", "--nproc-per-node", "2")
    try:
        with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
            accepted_any = accepted_deep = False
            for prompt in prompts[:3]:
                greedy = greedy_decode(local, prompt, 24).tokens
                assert greedy_decode(remote, prompt, 24).tokens == greedy
                chain = speculative_decode(remote, draft, prompt, 24, 4)
                tree = speculative_decode(remote, draft, prompt, 24, tree=TreeShape(depth=3, top_k=3, size=6))
                assert chain.tokens == tree.tokens == greedy
                accepted_any |= chain.target_forwards < len(chain.tokens)  # a crop after a partial acceptance
                accepted_deep |= len(tree.tokens) >= 2 * tree.target_forwards  # kept branches of 2+ nodes
            assert accepted_any and accepted_deep
    finally:
        server.stop()
