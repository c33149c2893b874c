"""epochwise.callbacks: schedules and the callbacks that apply them to any LightningModule."""

from .curves import LearningCurveMonitor, plot_learning_curves

__all__ = ["LearningCurveMonitor", "plot_learning_curves"]
