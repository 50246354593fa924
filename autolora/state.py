"""The counters a search carries between ``fit`` calls, checkpoints and restarts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerState:
    """Counters that let ``fit`` continue where it stopped."""

    step: int = 0  # weight steps taken (skipped ones included)
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # train batches consumed in the current epoch
    val_position: int = 0  # validation batches consumed in the current cycle
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient (or fp16 overflow)
    loss_scale: float = 1.0  # the dynamic float16 loss scale (1 without fp16 autocast)
    good_steps: int = 0  # steps since the loss scale last changed
    stopped_stable: bool = False  # the last fit call ended early: its rank plan had stopped changing
    compile_seconds: float = 0.0  # wall seconds of the passes that compiled a graph (compile=True)
    compiled_graphs: int = 0  # graphs torch.compile captured for this trainer (compile=True)


FP16_INIT_SCALE = 2.0**16
FP16_GROWTH_INTERVAL = 2000
