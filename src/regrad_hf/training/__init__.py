"""Meta-training a learner: [`ReGradTrainer`], a `transformers.Trainer` for the bi-level objective, its compact
resumable checkpoints, and the document gradients cached while the LoRA start is frozen.

Modules: `trainer` ([`ReGradTrainer`], [`ReGradTrainingArguments`], checked resume), `checkpoints` (compact
checkpoints: export, checks, the newest complete one), `gradient_cache` ([`DocumentGradientCache`]).
"""

from .trainer import (
    CompactCheckpointCallback,
    ReGradTrainer,
    ReGradTrainingArguments,
    RunIdentityCallback,
    WallClockCallback,
)

__all__ = [
    "CompactCheckpointCallback",
    "ReGradTrainer",
    "ReGradTrainingArguments",
    "RunIdentityCallback",
    "WallClockCallback",
]
