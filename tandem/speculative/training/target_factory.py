"""Which target a training run talks to: the in-process model, or remote servers (``--target-url``).

The trainer never imports the remote package (``remote/`` builds on the rest of ``speculative/``, never the
reverse): the CLI, ``python -m tandem.train`` and the demo hand ``build_target`` to it as its
``target_factory``, and ``train()`` imports this module lazily.
"""

from __future__ import annotations

import os
import socket
import uuid

from tandem.speculative.training.config import TrainConfig
from tandem.speculative.training.distributed import DistributedContext, target_urls_for_rank


def build_target(config: TrainConfig, distributed: DistributedContext | None = None):
    """The in-process target, or the remote client when ``target_urls`` is set (rank r: its share of them); a DFlash
    run's captures the DFlash layers (``config.aux_layer_ids``, else one a draft layer by the reference formula)."""
    distributed = distributed or DistributedContext()
    dflash = {} if config.method == "eagle3" else {"draft_method": config.method, "aux_layer_ids": config.aux_layer_ids,
                                                  "num_draft_layers": config.draft_layers}
    if config.target_urls:
        from tandem.speculative.remote.client import RemoteEagle3TargetModel

        urls = target_urls_for_rank(config.target_urls, distributed.rank, distributed.world_size)
        # The rank in the id makes the servers' per-client summary readable.
        client_id = f"{socket.gethostname()}-rank{distributed.rank}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return RemoteEagle3TargetModel(urls, device=distributed.device, prefetch_depth=config.prefetch_depth,
                                       client_id=client_id, nccl_rank=distributed.rank,
                                       timeout_s=config.request_timeout_s,
                                       supervision_encoding=config.supervision_encoding, **dflash)
    from tandem.models import load_target
    from tandem.speculative.target.model import Eagle3TargetModel

    model, _ = load_target(config.target, dtype=config.dtype, device=distributed.device)
    if dflash:
        return Eagle3TargetModel(model, **dflash)
    return Eagle3TargetModel(model, config.aux_layer_ids)
