"""DFlash data parallelism on real gloo ranks: two ranks at half the batch train the draft one process trains at the
global batch (the anchors drawn per sample, the loss normalised by the global slot weight), within float noise."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.dflash_trainer import DFlashTrainer
from tandem.speculative.training.trainer import train
from tests.moe.dist_utils import run_ranks
from tests.speculative.remote.remote_utils import save_tiny_target
from tests.speculative.training.test_data_parallel import assert_close_relative, write_chat_data

pytestmark = pytest.mark.timeout(240)
GLOBAL_BATCH = 4


def fields(root: Path, name: str, batch_size: int) -> dict:
    return dict(method="dflash", data=str(root / "data.jsonl"), output_dir=str(root / name),
                target=str(root / "target"), total_steps=3, batch_size=batch_size, max_seq_len=48, warmup_steps=1,
                grad_accum_steps=2, save_every=0, show_progress=False, learning_rate=3e-3, dtype="float32",
                draft_layers=2, block_size=4, num_anchors=6)


def _rank_run(root: str, rank: int, world_size: int) -> dict:
    trainer = train(TrainConfig(**fields(Path(root), "two_ranks", GLOBAL_BATCH // world_size)),
                    trainer_class=DFlashTrainer)
    return {"step": trainer.step, "weights": {k: v.numpy().copy() for k, v in trainer.draft.state_dict().items()}}


def test_two_ranks_match_one_process_at_the_global_batch(tmp_path):
    write_chat_data(tmp_path / "data.jsonl")
    save_tiny_target(tmp_path / "target")
    reference = train(TrainConfig(**fields(tmp_path, "one_process", GLOBAL_BATCH)), trainer_class=DFlashTrainer)
    ranks = run_ranks(2, functools.partial(_rank_run, str(tmp_path)), timeout=200)
    want = dict(reference.draft.state_dict())
    for out in ranks:
        assert out["step"] == 3
        assert_close_relative({k: torch.from_numpy(v) for k, v in out["weights"].items()}, want)
