"""A shortened ``bench/soak.py``: one server (data plane on), two training clients; a client's process group
torn down mid-transfer, the server killed and restarted and a client killed and resumed mid-run; every step
is applied exactly once and the final weights equal a fault-free run bit for bit."""

from __future__ import annotations

import pytest

from bench.soak import Fault, run_soak

pytestmark = pytest.mark.timeout(400)


def test_soak_with_group_teardown_server_and_client_kills_loses_and_repeats_nothing(tmp_path):
    schedule = [
        Fault(kind="teardown_pg", watch="a", at_step=1),  # first: clients never rebuild a lost group
        # Faults fire in order: the client kill comes before the server restart (which takes seconds), so
        # client b cannot run to its end while the watcher is still busy with an earlier fault.
        Fault(kind="kill_client", watch="b", at_step=3, target="b"),
        Fault(kind="kill_server", watch="a", at_step=5),
    ]
    # 12 steps: a fault fires when the watcher next polls, and on a loaded 2-vCPU machine that can be several
    # steps late (a kill meant for step 3 once landed at step 8 of 8, after the client's last request).
    steps = 12
    report = run_soak(tmp_path, steps=steps, save_every=2, schedule=schedule, time_limit_s=360)
    print(report.summary())
    assert report.ok, report.summary()
    assert [f.outcome.split(":")[0] for f in report.faults] == ["injected"] * 3, report.summary()
    assert "torn down mid-send" in report.faults[0].outcome
    assert report.recoveries == 3 and report.requests_served > 2 * steps
    assert report.exactly_once and report.weights_equal and report.final_loss_diff == 0.0
