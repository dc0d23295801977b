"""``/verify`` sessions that cannot be confused: rows 12-14 of issue 24's red team.

Every answer is compared with the in-process ``LocalDecodeSession`` doing the same steps on the same target:

- row 12: a session that crops back and verifies a second tree at the same base, then keeps the same branch
  indices as before, gets the second tree's branch (a keep is a retry only when it names the same tree);
- row 13: two clients sharing a client id and a session name never get each other's sequence: the server
  sees that its cached prefix is not the caller's, answers 409, and the caller sends its sequence again;
- row 14: a draft tree is charged what its ``n x (past + n)`` mask costs, so a star of hundreds of nodes
  that a chain's budget would admit is refused with 413 before the forward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.speculative.remote import protocol, wire
from tandem.speculative.remote.client import RemoteEagle3TargetModel
from tandem.speculative.remote.server import RequestError, TargetModelServer
from tests.speculative.remote.remote_utils import load_tiny_target, save_tiny_target, start_tiny_server

pytestmark = pytest.mark.timeout(240)

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 31, 64]])
TREE_1 = ([11, 20, 21, 30], [-1, 0, 0, 2])
TREE_2 = ([12, 25, 26, 35], [-1, 0, 0, 2])


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("verify_sessions") / "target")


@pytest.fixture(scope="module")
def local(target_dir):
    return load_tiny_target(target_dir)


@pytest.fixture(scope="module")
def server(target_dir):
    process = start_tiny_server(target_dir, target_dir.parent / "serve-target.log")
    yield process
    process.stop()


def assert_same_step(got, want) -> None:
    assert torch.equal(got.next_token_ids, want.next_token_ids)
    assert torch.equal(got.near_ties, want.near_ties)
    assert torch.allclose(got.aux_hidden_states, want.aux_hidden_states, atol=1e-5)


def rewind_and_keep_the_same_indices(session):
    """Row 12's steps; the answer of the last ``extend``."""
    base = PROMPT.shape[1]
    session.extend(PROMPT)
    session.extend(torch.tensor([TREE_1[0]]), TREE_1[1])
    session.keep_branch(base, [0, 2])
    session.extend(torch.tensor([[40]]))
    session.crop(base)  # rewind, and verify another tree at the same base
    session.extend(torch.tensor([TREE_2[0]]), TREE_2[1])
    session.keep_branch(base, [0, 2])  # the same indices, of another tree
    return session.extend(torch.tensor([[41]]))


def test_row12_keeping_the_same_indices_of_another_tree_is_not_taken_for_a_retry(server, local):
    want = rewind_and_keep_the_same_indices(local.decode_session())
    with RemoteEagle3TargetModel(server.url, enable_nccl=False) as remote:
        session = remote.decode_session()
        got = rewind_and_keep_the_same_indices(session)
        assert session.resent == 0  # kept in place on the server, not recovered by a resend
    assert_same_step(got, want)


def _verify(logic, client: str, ids: list[int], headers: dict, parents: list[int] | None = None):
    body = {"input_ids": torch.tensor([ids])}
    if parents is not None:
        body[protocol.VERIFY_TREE_KEY] = torch.tensor(parents)
    raw = bytearray(b"".join(bytes(b) for b in wire.encode(body)))
    reply = logic.handle(protocol.EP_VERIFY, raw, client_id=client, **headers)
    answer = wire.decode(bytearray(b"".join(bytes(b) for b in reply.body)))
    return answer["next_token_ids"]


def test_row12_a_retried_keep_is_still_recognised_and_a_keep_naming_no_digest_is_applied(local):
    # The request logic with the headers themselves: the same call sent twice (an answer lost on the way) keeps
    # the branch once; a client that names no tree digest (an older one) gets the selection applied, never skipped.
    base = PROMPT.shape[1]
    here = local.decode_session()
    here.extend(PROMPT)
    here.extend(torch.tensor([TREE_1[0]]), TREE_1[1])
    here.keep_branch(base, [0, 2])
    want = here.extend(torch.tensor([[40]])).next_token_ids
    here.crop(base)
    here.extend(torch.tensor([TREE_2[0]]), TREE_2[1])
    here.keep_branch(base, [0, 2])
    want_second = here.extend(torch.tensor([[41]])).next_token_ids

    logic = TargetModelServer(local, nccl_port=0)
    session = {"decode_session": "s"}
    _verify(logic, "c", PROMPT[0].tolist(), {**session, "past": "0"})
    _verify(logic, "c", TREE_1[0], {**session, "past": str(base)}, TREE_1[1])
    digest = protocol.tree_digest(base, *TREE_1)
    keep = {**session, "past": str(base + 2), "keep_branch": f"{base}:0,2/{digest}"}
    first = _verify(logic, "c", [40], keep)
    again = _verify(logic, "c", [40], keep)  # the retry
    assert torch.equal(first, want) and torch.equal(again, want)
    _verify(logic, "c", TREE_2[0], {**session, "past": str(base)}, TREE_2[1])
    no_digest = {**session, "past": str(base + 2), "keep_branch": f"{base}:0,2"}
    assert torch.equal(_verify(logic, "c", [41], no_digest), want_second)


def test_row13_two_clients_on_one_id_and_one_session_name_never_get_each_others_sequence(server, local):
    other_prompt = torch.tensor([[9, 8, 7, 6, 5]])
    here = local.decode_session()
    here.extend(PROMPT)
    want = here.extend(torch.tensor([[40, 41]]))
    with RemoteEagle3TargetModel(server.url, enable_nccl=False, client_id="shared-id") as one, \
            RemoteEagle3TargetModel(server.url, enable_nccl=False, client_id="shared-id") as two:
        mine, theirs = one.decode_session(), two.decode_session()
        assert mine.name != theirs.name and len(mine.name) >= 20  # no other process picks the same name
        theirs.name = mine.name  # as two processes that both numbered their first session 0 once did
        mine.extend(PROMPT)
        theirs.extend(other_prompt)  # replaces the one cache of "shared-id"
        got = mine.extend(torch.tensor([[40, 41]]))
        assert mine.resent == 1  # told 409 (another prefix is cached) and sent its own sequence again
        whole = local.decode_session().extend(torch.cat([PROMPT, torch.tensor([[40, 41]])], 1))
        assert torch.equal(got.next_token_ids, whole.next_token_ids[:, -2:])
        assert torch.equal(got.next_token_ids, want.next_token_ids)
        theirs_next = theirs.extend(torch.tensor([[4]]))
        assert theirs.resent == 1
        assert torch.equal(theirs_next.next_token_ids,
                           local.decode_session().extend(torch.cat([other_prompt, torch.tensor([[4]])], 1))
                           .next_token_ids[:, -1:])


def test_row13_a_prefix_that_is_not_the_cached_one_gets_409(local):
    logic = TargetModelServer(local, nccl_port=0)
    _verify(logic, "c", PROMPT[0].tolist(), {"decode_session": "s", "past": "0"})
    mine = protocol.prefix_digest(PROMPT[0].tolist())
    other = protocol.prefix_digest([9, 8, 7, 6, 5, 4, 3])
    assert _verify(logic, "c", [40], {"decode_session": "s", "past": "7", "prefix": mine}).shape == (1, 1)
    with pytest.raises(RequestError) as refused:
        _verify(logic, "c", [41], {"decode_session": "s", "past": "7", "prefix": other})
    assert refused.value.status == 409 and "send the whole sequence" in refused.value.message


def star(n: int) -> list[int]:
    return [-1] + [0] * (n - 1)


def test_row14_a_tree_is_charged_what_its_mask_costs(local):
    logic = TargetModelServer(local, nccl_port=0, max_batch_tokens=480)
    ids = torch.randint(3, 250, (1, 470)).tolist()[0]
    # A chain of 470 positions is within the budget of 480 tokens ...
    assert _verify(logic, "c", ids, {}).shape == (1, 470)
    # ... a star of 470 nodes (a 470 x 470 mask) is not: refused before the forward, naming the cost.
    with pytest.raises(RequestError) as refused:
        _verify(logic, "c", ids, {}, star(470))
    message = refused.value.message
    assert refused.value.status == 413 and "mask of 470 x 470" in message and "--max-batch-tokens" in message
    # A tree of a real decode's size is answered, as the in-process session answers it.
    small = ids[:24]
    want = local.decode_session().extend(torch.tensor([small]), star(24)).next_token_ids
    assert torch.equal(_verify(logic, "c", small, {}, star(24)), want)


def test_row14_the_tree_charge_grows_with_the_mask():
    from tandem.speculative.remote.serving.token_budget import tree_tokens

    per_token = 600_000  # about a float32 forward's bytes a token on a 49,152-token vocabulary
    real = tree_tokens(1000, 25, per_token, 4)
    assert 1025 <= real <= 1026  # a real tree costs what its tokens do, to a token
    star = tree_tokens(0, 8192, per_token, 4)
    assert star > 8192 + 1000  # its 8,192 x 8,192 mask is charged: ~800 MB
    assert tree_tokens(0, 2 * 8192, per_token, 4) - 2 * 8192 > 3.9 * (star - 8192)  # and grows as n**2
