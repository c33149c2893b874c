"""epochwise.callbacks: schedules and the callbacks that apply them to any LightningModule."""

from .batch_size import BatchSizeController, BatchSizeSchedule, BatchSizeWarmup
from .curves import LearningCurveMonitor, plot_learning_curves
from .engine import BatchSizeState, batch_state, lr_path
from .lr import LRScaling, LRWarmup, SampleBasedLRSchedule
from .schedules import MilestoneSchedule, WarmupSchedule, lr_scale

__all__ = [
    "BatchSizeController",
    "BatchSizeWarmup",
    "BatchSizeSchedule",
    "LRScaling",
    "LRWarmup",
    "SampleBasedLRSchedule",
    "LearningCurveMonitor",
    "plot_learning_curves",
    "BatchSizeState",
    "batch_state",
    "lr_path",
    "WarmupSchedule",
    "MilestoneSchedule",
    "lr_scale",
]
