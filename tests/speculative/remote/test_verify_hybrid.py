"""A hybrid-attention target (Qwen3-Next) decoded through a real ``tandem serve-target``'s ``/verify``.

The server's decode caches roll the recurrent states back as the in-process session does, so the remote decode
equals greedy decoding and the in-process speculative decode token for token; a draft tree is refused on
both sides in one line (the server says so in ``/model_info`` and answers a tree with 400).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.speculative.decoding.decode import greedy_decode, speculative_decode
from tandem.speculative.decoding.recurrent_state import TreeUnsupportedError
from tandem.speculative.decoding.tree import TreeShape
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.http_client import RemoteTargetError
from tests.speculative.remote.remote_utils import load_tiny_target, start_tiny_server
from tests.speculative.target_families import fitted_draft, save_family_target

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_family_target("qwen3_next", tmp_path_factory.mktemp("hybrid") / "target", seed=5)


@pytest.fixture(scope="module")
def server(target_dir):
    process = start_tiny_server(target_dir, target_dir.parent / "serve-target.log")
    yield process
    process.stop()


def test_hybrid_decoding_through_the_server_equals_greedy_and_the_in_process_decode(server, target_dir):
    local = load_tiny_target(target_dir)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 250, (1, 6)) for _ in range(2)]
    draft = fitted_draft(local, prompts)
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        assert remote.tree_refusal is not None and local.tree_refusal is not None
        rolled_back = False
        for prompt in prompts:
            greedy = greedy_decode(local, prompt, 20)
            assert greedy_decode(remote, prompt, 20).tokens == greedy.tokens
            here = speculative_decode(local, draft, prompt, 20, 4)
            there = speculative_decode(remote, draft, prompt, 20, 4)
            assert there.tokens == here.tokens == greedy.tokens
            assert (there.target_forwards, there.drafted) == (here.target_forwards, here.drafted)
            rolled_back |= there.drafted > len(there.tokens) - there.target_forwards
        assert rolled_back  # the server rolled recurrent states back at least once
        with pytest.raises(TreeUnsupportedError, match="drop --tree"):
            speculative_decode(remote, draft, prompts[0], 8, tree=TreeShape(depth=2, top_k=2, size=4))
        session = remote.decode_session()  # a client that sends a tree anyway is told 400
        with pytest.raises(RemoteTargetError, match="400.*a draft tree cannot be verified"):
            session.extend(torch.tensor([[5, 6, 7]]), tree_parents=[-1, 0, 0])
        assert greedy_decode(remote, prompts[0], 4).tokens == greedy_decode(local, prompts[0], 4).tokens  # serving on


def test_tandem_eval_of_a_draft_for_a_hybrid_target_equals_greedy(server, target_dir, tmp_path, capsys, caplog):
    """The command a user runs, in-process and against the server: outputs equal to greedy; ``--tree`` refused in
    one line (exit 2)."""
    import json

    from tandem.cli import main
    from tandem.speculative.export.eagle3 import export_draft
    from tests.conftest import write_chat_data

    local = load_tiny_target(target_dir)
    torch.manual_seed(2)
    draft = fitted_draft(local, [torch.randint(3, 250, (1, 6)) for _ in range(2)], steps=10)
    exported = export_draft(draft, tmp_path / "draft", aux_layer_ids=local.aux_layer_ids)
    prompts = write_chat_data(tmp_path / "prompts.jsonl", count=2)
    common = ["--draft", str(exported), "--prompts", str(prompts), "--limit", "2", "--max-new-tokens", "12"]
    in_process = ["--model", str(target_dir), "--dtype", "float32"]
    for where in (in_process, ["--target-url", server.url, "--tokenizer", str(target_dir)]):
        capsys.readouterr()
        assert main(["--log-level", "WARNING", "eval", *common, *where]) == 0
        assert json.loads(capsys.readouterr().out)["outputs_match"] is True
        caplog.clear()
        assert main(["--log-level", "WARNING", "eval", *common, *where, "--tree", "2,2,4"]) == 2
        assert "drop --tree" in caplog.text
