"""epochwise.callbacks: schedules and the callbacks that apply them to any LightningModule."""

from ._checks import ConfigurationError
from .adaptive import AdaptiveBatchSize, next_batch_size
from .batch_memory import (
    OPTIMIZER_STATE_COPIES,
    MemoryEstimate,
    estimate_max_batch_size,
    estimate_training_memory,
    probe_max_per_device,
)
from .batch_size import BatchSizeSchedule, BatchSizeWarmup
from .controller import BatchSizeController
from .budget import TrainingBudget, budget_fractions
from .curves import (
    DIAGNOSES,
    DIAGNOSIS_CODES,
    LearningCurveMonitor,
    diagnose,
    ema_series,
    plot_learning_curves,
)
from .engine import BatchSizeState, FitState, batch_state, fit_state
from .ensembles import (
    SnapshotEnsemble,
    evaluate_snapshot_ensemble,
    load_snapshot_state,
    snapshot_lr_factor,
)
from .epoch_math import EpochSuggestion, iterations_per_epoch, suggest_max_epochs, total_updates
from .gradient_noise import GradientNoiseScale
from .lr import LRScaling, LRWarmup, SampleBasedLRSchedule
from .lr_path import LRFactorCallback, LRPath, ScaledScheduler
from .noise_scale import (
    GradientNoiseEstimator,
    loglog_slope,
    minibatch_gradient_standard_error,
    noise_scale_estimates,
)
from .plans import EpochPlan, plan_epoch, simulate_fit
from .resizing import (
    ContinuousResizeSchedule,
    ProgressiveResizing,
    ResizeStage,
    StagedResizeSchedule,
    coupled_batch_size,
    resize_batch,
)
from .schedules import MilestoneSchedule, WarmupSchedule, lr_scale
from .stopping import (
    EarlyStopping,
    MetricCriterion,
    MetricTracker,
    MultiMetricEarlyStopping,
    decide_stop,
    improved,
    improvement_margin,
    significant_improvement,
    student_t_cdf,
    welch_t_test,
)

__all__ = [
    "ConfigurationError",
    "BatchSizeController",
    "BatchSizeWarmup",
    "BatchSizeSchedule",
    "AdaptiveBatchSize",
    "next_batch_size",
    "GradientNoiseScale",
    "GradientNoiseEstimator",
    "noise_scale_estimates",
    "minibatch_gradient_standard_error",
    "loglog_slope",
    "LRScaling",
    "LRWarmup",
    "SampleBasedLRSchedule",
    "LearningCurveMonitor",
    "plot_learning_curves",
    "BatchSizeState",
    "FitState",
    "batch_state",
    "fit_state",
    "LRFactorCallback",
    "LRPath",
    "ScaledScheduler",
    "EpochPlan",
    "plan_epoch",
    "simulate_fit",
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
    "student_t_cdf",
    "welch_t_test",
    "ProgressiveResizing",
    "ContinuousResizeSchedule",
    "StagedResizeSchedule",
    "ResizeStage",
    "coupled_batch_size",
    "resize_batch",
]
