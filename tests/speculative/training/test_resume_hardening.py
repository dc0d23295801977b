"""What a clumsy user (or a crash) does to a ``tandem train`` run, against real trainer subprocesses
(issue 14, items 6-8): damaged checkpoints and caches, foreign files in the checkpoint directory, a torn
metrics line, ``--save-every 0``, resuming with other data or settings, malformed data files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.soak import effective_history, exported, read_metrics, train_command, write_chat_data
from tandem.speculative.training import checkpoint
from tandem.speculative.training.data import DataFormatError, read_chat_jsonl
from tests.speculative.remote.remote_utils import save_tiny_target

pytestmark = pytest.mark.timeout(600)

STEPS = 6


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trainer_hardening")
    write_chat_data(root / "data.jsonl")
    save_tiny_target(root / "target")
    return root


def train(root: Path, name: str, *flags: str, data: Path | None = None, resume: bool = False):
    cmd = train_command(root, name, root / "target", STEPS, 2, resume=resume) + list(flags)
    if data is not None:
        cmd[cmd.index("--data") + 1] = str(data)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


# ---------------------------------------------------------------- 7. checkpoints survive damage


def test_resume_falls_back_past_damaged_checkpoints_and_tolerates_what_a_user_left(root):
    uninterrupted = subprocess.Popen(train_command(root, "straight", root / "target", STEPS, 2),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = train(root, "damaged", "--stop-at-step", "4", "--keep-checkpoints", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "damaged"
    assert checkpoints(run) == ["step_2.pt", "step_4.pt"]
    # The damage: a truncated newest checkpoint, an empty file named like a newer one, a truncated
    # vocabulary cache, a torn last metrics line; and files of the user's that tandem must not touch.
    newest = run / "checkpoints" / "step_4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (run / "checkpoints" / "step_5.pt").write_bytes(b"")
    shutil.copy(run / "checkpoints" / "step_2.pt", run / "checkpoints" / "step_best.pt")
    (run / "checkpoints" / "step_60_backup.pt").write_bytes(b"the user's")
    (run / "checkpoints" / "notes.txt").write_text("keep me")
    vocab = run / "draft_vocab.safetensors"
    vocab.write_bytes(vocab.read_bytes()[:100])
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "lo')
    # --save-every 0: only at the end (once a modulo by zero after the first step).
    resumed = train(root, "damaged", "--save-every", "0", "--keep-checkpoints", "3", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    log = resumed.stderr
    assert "step_5.pt does not load" in log and "step_4.pt does not load" in log and "renamed" in log
    assert "draft vocabulary cache" in log and "unreadable" in log
    assert "is not a metrics row" in log
    assert checkpoints(run) == sorted(["notes.txt", "step_2.pt", "step_4.pt.unreadable", "step_5.pt.unreadable",
                                       "step_60_backup.pt", "step_6.pt", "step_best.pt"])
    history, problems = effective_history(read_metrics(run))
    assert not problems and [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert uninterrupted.wait(240) == 0
    straight = read_metrics(root / "straight")
    assert [row["loss"] for row in history] == [row["loss"] for row in straight]
    got, want = exported(run), exported(root / "straight")
    assert all(torch.equal(got[key], want[key]) for key in want)


def test_rotation_deletes_only_what_tandem_wrote(tmp_path):
    for name in ("step_2.pt", "step_4.pt", "step_10.pt", "step_best.pt", "step_60_backup.pt", "step_07.pt"):
        (tmp_path / name).write_bytes(b"x")
    deleted = checkpoint.rotate(tmp_path, keep=1)
    assert sorted(p.name for p in deleted) == ["step_2.pt", "step_4.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_07.pt", "step_10.pt", "step_60_backup.pt",
                                                          "step_best.pt"]
    assert [checkpoint.checkpoint_due(step, 0, 5) for step in range(1, 6)] == [False] * 4 + [True]


# ---------------------------------------------------------------- 6. resume checks what it resumes


def test_resume_with_other_data_or_settings_is_refused_naming_the_field_unless_allowed(root):
    first = train(root, "identity", "--stop-at-step", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "identity"
    other_data = root / "other.jsonl"  # the same target vocabulary, other contents (letters, not digits)
    with open(other_data, "w") as handle:
        for i in range(24):
            answer = " ".join("qwertyuiopzxcv"[(i * 5 + j) % 14] * (1 + j % 3) for j in range(10))
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    refused = train(root, "identity", "--learning-rate", "1e-2", data=other_data, resume=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--data (its contents' digest)" in refused.stderr and "--allow-resume-mismatch" in refused.stderr
    assert "--learning-rate: checkpoint 0.003, now 0.01" in refused.stderr
    assert [row["step"] for row in read_metrics(run)] == [1, 2]  # nothing was trained

    # The vocabulary the checkpoint's lm_head rows were trained for (read now: the resumed run rotates it out).
    checkpointed = torch.load(run / "checkpoints" / "step_2.pt", weights_only=True)["draft"]["d2t"]
    allowed = train(root, "identity", "--allow-resume-mismatch", data=other_data, resume=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "--resume with --allow-resume-mismatch: --data" in allowed.stderr
    # The draft keeps the vocabulary its lm_head rows were trained for, and the target is told that one, so
    # the exported d2t agrees with the supervision the run got, not with a vocabulary built from the new data.
    assert torch.equal(exported(run)["d2t"], checkpointed)
    rebuilt = load_file(str(run / "draft_vocab.safetensors"))["selected_token_ids"]
    assert not torch.equal(rebuilt - torch.arange(rebuilt.numel()), checkpointed)


# ---------------------------------------------------------------- 8. bad data names its place


GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
BAD_LINES = {
    "non-UTF-8 byte": (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "bad.jsonl:2: not UTF-8: byte 0xe9"),
    "deep nesting": (b"[" * 100_000, "bad.jsonl:2: invalid JSON: nested too deeply"),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800 alone"}]}',
                       "bad.jsonl:2: a string holds the lone surrogate escape \\ud800"),
}


def write_bad(directory: Path, name: str) -> Path:
    bad = directory / "bad.jsonl"
    bad.write_bytes(GOOD_LINE.encode() + b"\n" + BAD_LINES[name][0] + b"\n")
    return bad


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_malformed_data_line_is_an_error_naming_file_and_line(tmp_path, name):
    with pytest.raises(DataFormatError) as info:
        read_chat_jsonl(write_bad(tmp_path, name))
    assert BAD_LINES[name][1] in str(info.value)


def test_tandem_train_on_a_non_utf8_line_says_where_it_is_without_a_traceback(root, tmp_path):
    result = train(root, "bad_data", data=write_bad(tmp_path, "non-UTF-8 byte"))
    assert result.returncode == 2
    assert BAD_LINES["non-UTF-8 byte"][1] in result.stderr and "Traceback" not in result.stderr
