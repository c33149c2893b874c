"""epochwise.callbacks: schedules and the callbacks that apply them to any LightningModule."""

from ._checks import ConfigurationError
from .adaptive import AdaptiveBatchSize, next_batch_size
from .batch_memory import (
    OPTIMIZER_STATE_COPIES,
    BatchSizeSearch,
    MemoryEstimate,
    estimate_max_batch_size,
    estimate_training_memory,
    find_max_batch_size,
    probe_max_per_device,
    search_max_batch_size,
)
from .batch_size import BatchSizeSchedule, BatchSizeWarmup
from .best_weights import BestWeights
from .budget import TrainingBudget, budget_fractions
from .controller import BatchSizeController
from .curriculum import CurriculumSampling
from .curriculum_schedules import CurriculumPacing
from .curves import (
    DIAGNOSES,
    DIAGNOSIS_CODES,
    LearningCurveMonitor,
    diagnose,
    ema_series,
    plot_learning_curves,
)
from .early_stopping import EarlyStopping
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
from .lr_path import LRFactorCallback, LRMonitor, LRPath, ScaledScheduler
from .metric_tracking import MetricCriterion, MetricTracker, decide_stop
from .micro_batch import AutoMicroBatch
from .multi_metric_stopping import MultiMetricEarlyStopping
from .noise_scale import (
    GradientNoiseEstimator,
    loglog_slope,
    minibatch_gradient_standard_error,
    noise_scale_estimates,
)
from .one_cycle import OneCycleBatchLR
from .one_cycle_schedules import OneCycleBatchLRSchedule
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
from .seq_len import SequenceLengthWarmup
from .seq_len_schedules import SequenceLengthSchedule, coupled_batch_for_length, truncate_sequences
from .significance import significant_improvement, welch_t_test
from .stopping_rules import evaluate_check, improved, improvement_margin

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
    "AutoMicroBatch",
    "LRWarmup",
    "SampleBasedLRSchedule",
    "LearningCurveMonitor",
    "plot_learning_curves",
    "BatchSizeState",
    "FitState",
    "batch_state",
    "fit_state",
    "LRFactorCallback",
    "LRMonitor",
    "LRPath",
    "ScaledScheduler",
    "EpochPlan",
    "plan_epoch",
    "simulate_fit",
    "WarmupSchedule",
    "MilestoneSchedule",
    "lr_scale",
    "probe_max_per_device",
    "find_max_batch_size",
    "search_max_batch_size",
    "BatchSizeSearch",
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
    "OneCycleBatchLR",
    "OneCycleBatchLRSchedule",
    "CurriculumSampling",
    "CurriculumPacing",
    "SequenceLengthWarmup",
    "SequenceLengthSchedule",
    "coupled_batch_for_length",
    "truncate_sequences",
]
