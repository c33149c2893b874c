"""Former home of the early-stopping callbacks, kept so ``epochwise.callbacks.stopping`` imports work.

Each concept now has its own module: :mod:`.early_stopping`, :mod:`.multi_metric_stopping`,
:mod:`.best_weights`, :mod:`.metric_tracking`, :mod:`.significance`, :mod:`.stopping_rules`.
"""

from .best_weights import BestWeights
from .early_stopping import EarlyStopping
from .metric_tracking import MetricCriterion, MetricTracker, decide_stop
from .multi_metric_stopping import MultiMetricEarlyStopping
from .significance import significant_improvement, welch_t_test
from .stopping_rules import evaluate_check, improved, improvement_margin

__all__ = [
    "EarlyStopping",
    "MultiMetricEarlyStopping",
    "BestWeights",
    "MetricCriterion",
    "MetricTracker",
    "decide_stop",
    "evaluate_check",
    "improved",
    "improvement_margin",
    "significant_improvement",
    "welch_t_test",
]
