"""A CPU target reads grouped key/value heads in place (models.GROUPED_ATTENTION_FLAG): the same bits as
transformers' repeated heads, for the masked multi-token forwards a verification runs."""

import os

import torch
from transformers import DynamicCache

from tandem.models import GROUPED_ATTENTION_FLAG, load_target
from tandem.speculative.target.model import Eagle3TargetModel
from tests.speculative.remote.remote_utils import save_tiny_target


def test_loading_a_cpu_target_sets_the_flag_and_verifications_are_bit_identical(tmp_path, monkeypatch):
    monkeypatch.delenv(GROUPED_ATTENTION_FLAG, raising=False)
    model, _ = load_target(str(save_tiny_target(tmp_path / "target")), dtype="float32")
    assert os.environ[GROUPED_ATTENTION_FLAG] == "1"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped heads to read
    target = Eagle3TargetModel(model)
    torch.manual_seed(0)
    prompt, chain = torch.randint(3, 200, (1, 12)), torch.randint(3, 200, (1, 5))
    tree_parents = [-1, 0, 0, 1, 2]

    def verify(flag: str, parents):
        monkeypatch.setenv(GROUPED_ATTENTION_FLAG, flag)
        cache = DynamicCache()
        target.forward_cached(prompt, cache)
        return target.forward_cached(chain, cache, parents)

    for parents in (None, tree_parents):
        grouped, repeated = verify("1", parents), verify("0", parents)
        for a, b in zip(grouped, repeated):
            assert torch.equal(a, b)


def test_a_value_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(GROUPED_ATTENTION_FLAG, "0")
    load_target(str(save_tiny_target(tmp_path / "target")), dtype="float32")
    assert os.environ[GROUPED_ATTENTION_FLAG] == "0"
