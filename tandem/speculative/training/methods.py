"""Which trainer trains which draft method: the one place that knows every method's trainer.

``trainer.py`` trains EAGLE-3 and ``dflash_trainer.py`` (built on it) trains DFlash; this module sits above both,
so the command line and the demo pick a trainer by ``TrainConfig.method`` without ``trainer.py`` importing its
own subclass.
"""

from __future__ import annotations

from tandem.speculative.training.dflash_trainer import DFlashTrainer
from tandem.speculative.training.trainer import Trainer

TRAINERS = {Trainer.METHOD: Trainer, DFlashTrainer.METHOD: DFlashTrainer}


def trainer_class_for(method: str) -> type[Trainer]:
    """The ``Trainer`` class of ``method`` (``eagle3`` or ``dflash``)."""
    if method not in TRAINERS:
        raise ValueError(f"no trainer for draft method {method!r}; known: {sorted(TRAINERS)}")
    return TRAINERS[method]
