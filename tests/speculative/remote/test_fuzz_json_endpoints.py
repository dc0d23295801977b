"""Property-based fuzzing of the control-plane JSON: the server's JSON endpoints and the data-plane
metadata parser, with a fixed budget (DESIGN 3.1, 3.4).

Random JSON, the fields the endpoints read with wrong types, integers past Python's digit limit and
nesting deeper than the stack: each request is answered 200 or refused with a 4xx ``RequestError`` --
never a 500 (a server fault), never another exception. ``decode_nccl_metadata`` (the client parsing a
server's answer) parses or raises ``ProtocolError`` and never passes a description it cannot allocate.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz_wire import check_json_body, json_bodies
from tandem.speculative.remote import protocol
from tandem.speculative.remote.server import TargetModelServer
from tandem.speculative.remote.serving.request_checks import RequestError
from tandem.speculative.target.model import Eagle3TargetModel
from tests.conftest import build_tiny_llama

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JSON_ENDPOINTS = [protocol.EP_HEALTH, protocol.EP_MODEL_INFO, protocol.EP_INIT_NCCL, protocol.EP_HEARTBEAT,
                  protocol.EP_DISCONNECT]
NCCL_STATUSES = {protocol.NCCL_STATUS_OK, protocol.NCCL_STATUS_ALREADY, protocol.NCCL_STATUS_FAILED,
                 protocol.NCCL_STATUS_DISABLED}


@pytest.fixture(scope="module")
def logic():
    # The data plane off: a fuzzed port must never start a real rendezvous (TANDEM_ENABLE_NCCL=0 is
    # read when the server is built; set by hand because monkeypatch is function-scoped).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TANDEM_ENABLE_NCCL", "0")
        yield TargetModelServer(Eagle3TargetModel(build_tiny_llama()), nccl_port=1, token="t")


def answer(logic: TargetModelServer, endpoint: str, raw: bytes, client_id: str) -> tuple[int, dict]:
    """``(status, JSON body)`` as the HTTP plumbing would send them."""
    try:
        reply = logic.handle(endpoint, raw, client_id=client_id)
    except RequestError as exc:
        return exc.status, {"error": exc.message}
    return 200, protocol.decode_json(b"".join(bytes(b) for b in reply.body))


@FUZZ
@given(st.sampled_from(JSON_ENDPOINTS), json_bodies, st.text(min_size=1, max_size=12))
def test_json_endpoints_answer_200_or_400_to_any_body(logic, endpoint, raw, client_id):
    status, payload = answer(logic, endpoint, raw, client_id)
    assert status in (200, 400), (status, payload)
    if status == 400:
        assert payload["error"]  # names the problem
    elif endpoint == protocol.EP_INIT_NCCL:
        assert payload["status"] in NCCL_STATUSES


@pytest.mark.parametrize("raw", [
    b'{"nccl_port": 1' + b"0" * 5000 + b"}",  # past int_max_str_digits: ValueError, not JSONDecodeError
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the stack: RecursionError
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"\xff\xfe{}",  # not UTF-8
])
def test_json_past_the_parsers_limits_is_400_not_500(logic, raw):
    """Found by the fuzzer: these escaped decode_json as ValueError/RecursionError, so /init_nccl said 500."""
    status, payload = answer(logic, protocol.EP_INIT_NCCL, raw, "limits")
    assert status == 400 and "JSON" in payload["error"]


@pytest.mark.parametrize("port", ["8000", 1.5, True, None, [1], {"p": 1}, -1, 0, 65536, 10**40])
def test_init_nccl_with_a_wrong_port_never_fails_the_server(logic, port):
    status, payload = answer(logic, protocol.EP_INIT_NCCL, json.dumps({"nccl_port": port}).encode(), "ports")
    assert status == 400 or (status == 200 and payload["status"] == protocol.NCCL_STATUS_DISABLED)


@FUZZ
@given(json_bodies)
def test_data_plane_metadata_parses_or_raises_protocol_error(raw):
    check_json_body(raw)


@pytest.mark.parametrize("entry, fragment", [
    ({"dtype_code": [1], "shape": [1]}, "dtype_code"),  # found by the fuzzer: unhashable, TypeError
    ({"dtype_code": 1.0, "shape": [1]}, "dtype_code"),  # found by the fuzzer: passed as float64
    ({"dtype_code": 0, "shape": [2**62, 4]}, "int64"),  # a description nobody can allocate
    ({"dtype_code": 0, "shape": [1, -1]}, "shape"),
    ({"dtype_code": True, "shape": [1]}, "dtype_code"),
])
def test_data_plane_metadata_refuses_bad_entries(entry, fragment):
    raw = json.dumps({"keys_order": ["a"], "metadata": {"a": entry}}).encode()
    with pytest.raises(protocol.ProtocolError, match=fragment):
        protocol.decode_nccl_metadata(raw)
