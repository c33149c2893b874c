"""epochwise.callbacks: schedules and the callbacks that apply them to any LightningModule."""

from .batch_size import (
    BatchSizeController,
    BatchSizeSchedule,
    BatchSizeWarmup,
    probe_max_per_device,
)
from .best_weights import BestWeights
from .budget import TrainingBudget, budget_fractions
from .curves import (
    DIAGNOSES,
    DIAGNOSIS_CODES,
    LearningCurveMonitor,
    diagnose,
    ema_series,
    plot_learning_curves,
)
from .early_stopping import EarlyStopping
from .engine import BatchSizeState, batch_state, lr_path
from .ensembles import (
    SnapshotEnsemble,
    evaluate_snapshot_ensemble,
    load_snapshot_state,
    snapshot_lr_factor,
)
from .epoch_math import (
    OPTIMIZER_STATE_COPIES,
    EpochSuggestion,
    MemoryEstimate,
    estimate_max_batch_size,
    estimate_training_memory,
    iterations_per_epoch,
    suggest_max_epochs,
    total_updates,
)
from .lr import LRScaling, LRWarmup, SampleBasedLRSchedule
from .metric_tracking import MetricCriterion, MetricTracker, decide_stop
from .multi_metric_stopping import MultiMetricEarlyStopping
from .resizing import (
    ContinuousResizeSchedule,
    ProgressiveResizing,
    ResizeStage,
    StagedResizeSchedule,
    coupled_batch_size,
    resize_batch,
)
from .schedules import MilestoneSchedule, WarmupSchedule, lr_scale
from .significance import significant_improvement, welch_t_test
from .stopping_rules import evaluate_check, improved, improvement_margin

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
    "probe_max_per_device",
    "TrainingBudget",
    "budget_fractions",
    "DIAGNOSES",
    "DIAGNOSIS_CODES",
    "diagnose",
    "ema_series",
    "SnapshotEnsemble",
    "evaluate_snapshot_ensemble",
    "load_snapshot_state",
    "snapshot_lr_factor",
    "OPTIMIZER_STATE_COPIES",
    "EpochSuggestion",
    "MemoryEstimate",
    "estimate_max_batch_size",
    "estimate_training_memory",
    "iterations_per_epoch",
    "suggest_max_epochs",
    "total_updates",
    "EarlyStopping",
    "MultiMetricEarlyStopping",
    "MetricCriterion",
    "MetricTracker",
    "decide_stop",
    "improved",
    "improvement_margin",
    "significant_improvement",
    "welch_t_test",
    "BestWeights",
    "evaluate_check",
    "ProgressiveResizing",
    "ContinuousResizeSchedule",
    "StagedResizeSchedule",
    "ResizeStage",
    "coupled_batch_size",
    "resize_batch",
]
