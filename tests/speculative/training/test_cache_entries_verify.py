"""Supervision cache entries that know what they are: rows 1-4 of issue 24's red team.

A cache entry's file name says which sample it answers and its directory which target, dtype and vocabulary;
names can lie. Each test damages a filled cache the way the red team did -- another target's directory under
this run's identity name, two entries' files swapped, entries converted to float16, an entry of the wrong
shape -- and checks that the run notices (every such entry refused, counted and recomputed), and that it
trains exactly the draft a run over a fresh cache trains.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tandem.speculative.training.supervision_cache import entry_problem, entry_record
from tests.speculative.remote.remote_utils import load_tiny_target, save_tiny_target
from tests.speculative.training.test_supervision_cache import assert_same_weights, run, write_chat_data

SAMPLES = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache_trust")
    write_chat_data(root / "data.jsonl", count=SAMPLES)
    save_tiny_target(root / "target")
    save_tiny_target(root / "other-target", seed=1)  # same shapes, other weights
    return root


@pytest.fixture(scope="module")
def fresh(root):
    """A run that fills its cache from scratch: the reference every damaged run must equal."""
    return run(root, "fresh", supervision_cache=str(root / "cache-fresh"))


def copy_of_fresh_cache(root: Path, name: str) -> tuple[Path, Path]:
    """A copy of the fresh cache and its one identity directory."""
    cache = root / name
    shutil.copytree(root / "cache-fresh", cache)
    (directory,) = [p for p in cache.iterdir() if p.is_dir()]
    return cache, directory


def entries(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.safetensors"))


def rewrite_entry(path: Path, change) -> None:
    """Rewrite an entry's tensors with ``change(tensors)``, keeping its metadata (its claims) as they were."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_a_cache_copied_elsewhere_verifies_and_is_used(root, fresh):
    cache, _ = copy_of_fresh_cache(root, "cache-copied")
    copied = run(root, "copied", supervision_cache=str(cache))
    assert (copied.supervision_cache.hits, copied.supervision_cache.refused) == (28, 0)
    assert_same_weights(fresh, copied)


def test_row1_another_targets_directory_under_this_identity_name_is_refused(root, fresh, caplog):
    other = run(root, "other", target=load_tiny_target(root / "other-target"),
                supervision_cache=str(root / "cache-other"))
    (foreign,) = [p for p in (root / "cache-other").iterdir() if p.is_dir()]
    cache = root / "cache-row1"
    own_name = fresh.supervision_cache.directory.name
    shutil.copytree(foreign, cache / own_name)  # the other target's entries where this run looks for its own
    assert entries(cache / own_name)
    victim = run(root, "row1", supervision_cache=str(cache))
    assert (victim.supervision_cache.refused, victim.supervision_cache.misses) == (SAMPLES, SAMPLES)
    assert "computed for another identity" in caplog.text and "identity.json is not this run's" in caplog.text
    assert "12 of them in place of entries that did not verify" in victim.supervision_cache.summary()
    assert_same_weights(fresh, victim)
    with pytest.raises(AssertionError):
        assert_same_weights(other, victim)  # the foreign answers were not trained on


def test_row2_swapped_entries_are_refused(root, fresh, caplog):
    cache, directory = copy_of_fresh_cache(root, "cache-row2")
    first, second = entries(directory)[:2]
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    victim = run(root, "row2", supervision_cache=str(cache))
    assert (victim.supervision_cache.refused, victim.supervision_cache.misses) == (2, 2)
    assert "answers another sample" in caplog.text
    assert_same_weights(fresh, victim)


def test_row3_float16_entries_in_a_float32_run_are_refused(root, fresh, caplog):
    cache, directory = copy_of_fresh_cache(root, "cache-row3")
    for path in entries(directory):
        rewrite_entry(path, lambda t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}))
    victim = run(root, "row3", supervision_cache=str(cache))
    assert (victim.supervision_cache.refused, victim.supervision_cache.misses) == (SAMPLES, SAMPLES)
    assert "is float16" in caplog.text and "expected float32" in caplog.text
    assert_same_weights(fresh, victim)


def test_row4_an_entry_of_the_wrong_shape_is_refused_naming_it(root, fresh, caplog):
    cache, directory = copy_of_fresh_cache(root, "cache-row4")
    victim_path = entries(directory)[0]
    rewrite_entry(victim_path, lambda t: t.update(aux_hidden_states=t["aux_hidden_states"][:-1]))
    victim = run(root, "row4", supervision_cache=str(cache))
    assert (victim.supervision_cache.refused, victim.supervision_cache.misses) == (1, 1)
    assert str(victim_path) in caplog.text and "aux_hidden_states is float32" in caplog.text
    assert_same_weights(fresh, victim)


def test_entry_check_is_generic_over_the_layout():
    # Whatever tensors a method's entries hold (issue 22 adds others), the check is the same.
    layout = {"hidden": ((8,), torch.float32), "mask": ((), torch.bool)}
    good = {"hidden": torch.zeros(5, 8), "mask": torch.ones(5, dtype=torch.bool)}
    meta = {"tandem_entry": entry_record("k", "i")}
    assert entry_problem(good, meta, "k", "i", layout, 5) is None
    assert "another sample" in entry_problem(good, meta, "x", "i", layout, 5)
    assert "another identity" in entry_problem(good, meta, "k", "j", layout, 5)
    assert "expected float32 [4, 8]" in entry_problem(good, meta, "k", "i", layout, 4)
    assert "holds" in entry_problem({"hidden": good["hidden"]}, meta, "k", "i", layout, 5)
    assert "not a JSON object" in entry_problem(good, {"tandem_entry": "[1]"}, "k", "i", layout, 5)
