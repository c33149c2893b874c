"""epochwise.modules: LightningModules, backbones and optimizers."""

from .backbones import MLP, ResNet, SimpleCNN, build_backbone, resnet18, resnet20
from .classifier import ImageClassifier
from .optim import LARS

__all__ = ["ImageClassifier", "SimpleCNN", "ResNet", "MLP", "resnet20", "resnet18", "build_backbone", "LARS"]
