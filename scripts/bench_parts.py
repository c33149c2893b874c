"""The pieces of ``scripts/bench.py``: data, models, the raw loop, timers and micro-benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from epochwise.callbacks import (
    BatchSizeSchedule,
    EarlyStopping,
    LearningCurveMonitor,
    LRScaling,
    LRWarmup,
    MultiMetricEarlyStopping,
    ProgressiveResizing,
    SampleBasedLRSchedule,
    TrainingBudget,
)
from epochwise.datamodules import DigitsDataModule, ImageArrays, InMemoryImageDataModule
from epochwise.datamodules.sampler import close_loader, resizable_copy
from epochwise.modules import MLP, ImageClassifier, SimpleCNN, resnet20

#: Every epochwise callback that claims to cost nothing per step, set up to change no work
#: (factories of the per-device batch size and the image side). The "all" arm uses every one.
ZERO_COST_CALLBACKS: dict[str, Callable[[int, int], Callback]] = {
    "BatchSizeSchedule": lambda batch, side: BatchSizeSchedule({0: batch}),
    "ProgressiveResizing": lambda batch, side: ProgressiveResizing(stages=[(0, side)], couple_batch_size=False),
    "LRScaling": lambda batch, side: LRScaling("sqrt"),
    "LRWarmup": lambda batch, side: LRWarmup(1),
    "SampleBasedLRSchedule": lambda batch, side: SampleBasedLRSchedule("cosine", total_samples=10**12),
    "TrainingBudget": lambda batch, side: TrainingBudget(max_samples=10**12),
    "LearningCurveMonitor": lambda batch, side: LearningCurveMonitor(),
    "EarlyStopping": lambda batch, side: EarlyStopping("val_loss", patience=1000, restore_best_weights=True),
    "MultiMetricEarlyStopping": lambda batch, side: MultiMetricEarlyStopping({"val_loss": {"patience": 1000}}),
}

#: Image side each benchmark model trains at.
SIDE = {"simple_cnn": 28, "resnet20": 32, "tiny_mlp": 8}


class StepTimer(Callback):
    """Wall time between consecutive ``on_train_batch_start`` of an epoch, from the second epoch on."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch > 0:
            self.times.append(now - self._last)
        self._last = now

    def on_train_epoch_end(self, trainer, pl_module):
        self._last = None  # the epoch's last step includes validation: not timed


class RandomImages(InMemoryImageDataModule):
    """CIFAR-shaped random uint8 images held in memory (no files)."""

    num_classes, num_channels = 10, 3

    def __init__(self, n: int = 50_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n

    def load_arrays(self) -> ImageArrays:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (self.n + 1000, 3, 32, 32), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, 10, (self.n + 1000,), generator=g)
        return ImageArrays(images[: self.n], targets[: self.n], images[self.n :], targets[self.n :])


def make_data(model: str, batch: int, device: str, quick: bool) -> pl.LightningDataModule:
    if model == "resnet20":
        return RandomImages(n=5_000 if quick else 50_000, batch_size=batch)
    return DigitsDataModule(batch_size=batch, image_size=8 if model == "tiny_mlp" else 28)


def make_backbone(model: str, channels: int) -> torch.nn.Module:
    if model == "resnet20":
        return resnet20(in_channels=channels)
    if model == "tiny_mlp":
        return MLP(in_channels=channels, input_size=8, hidden=(32,))
    return SimpleCNN(in_channels=channels)


def make_model(model: str, data: pl.LightningDataModule) -> ImageClassifier:
    channels = getattr(data, "num_channels", 1)
    return ImageClassifier(backbone=make_backbone(model, channels), in_channels=channels, optimizer="sgd", lr=0.05)


def raw_step_times(model: str, batch: int, device: str, precision: str, epochs: int, quick: bool) -> list[float]:
    """A plain PyTorch loop over the DataModule's own loader and per-batch transform."""
    torch.manual_seed(0)
    data = make_data(model, batch, device, quick)
    data.setup("fit")
    net = make_backbone(model, getattr(data, "num_channels", 1)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device) if precision == "16-mixed" else None
    times: list[float] = []
    for epoch in range(epochs):
        last = None
        for batch_data in data.train_dataloader():
            now = time.perf_counter()
            if last is not None and epoch > 0:
                times.append(now - last)
            last = now
            x, y = (t.to(device, non_blocking=True) for t in batch_data[:2])
            x, y = data.on_after_batch_transfer([x, y], 0)[:2]
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    return times


def training_flops_per_sample(model: str) -> float:
    """Forward FLOPs of one sample (FlopCounterMode) x 3 for forward + backward."""
    net = make_backbone(model, 3 if model == "resnet20" else 1)
    side = 32 if model == "resnet20" else 28
    x = torch.zeros(8, 3 if model == "resnet20" else 1, side, side)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return 3.0 * counter.get_total_flops() / 8


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """The best FLOP/s of ``n x n`` matrix products on this machine (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


class PerSampleDigits(Dataset):
    """Digits served one sample at a time (the common user DataLoader shape)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.rand(1400, 1, 28, 28, generator=g), torch.randint(0, 10, (1400,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _first_batch_of(iterator, size: int) -> None:
    while next(iterator)[0].shape[0] != size:
        pass


def batch_change_times(repeats: int) -> tuple[float, float]:
    """Median ms to the first batch of a new size: rebuilding a 2-worker DataLoader vs in place."""
    data, sizes = PerSampleDigits(), (32, 64)
    rebuild, in_place = [], []
    twin = resizable_copy(DataLoader(data, batch_size=sizes[0], shuffle=True, num_workers=2, persistent_workers=True))
    for _ in twin:  # start the workers
        pass
    for r in range(repeats):
        new = sizes[(r + 1) % 2]
        start = time.perf_counter()
        twin.batch_sampler.batch_size = new  # at an epoch boundary, as the engine changes it
        iterator = iter(twin)
        _first_batch_of(iterator, new)
        in_place.append(1e3 * (time.perf_counter() - start))
        for _ in iterator:
            pass
        old = DataLoader(data, batch_size=sizes[r % 2], shuffle=True, num_workers=2, persistent_workers=True)
        for _ in old:
            pass
        start = time.perf_counter()
        rebuilt = DataLoader(data, batch_size=new, shuffle=True, num_workers=2, persistent_workers=True)
        _first_batch_of(iter(rebuilt), new)
        rebuild.append(1e3 * (time.perf_counter() - start))
        close_loader(old)
        close_loader(rebuilt)
    close_loader(twin)
    return statistics.median(rebuild), statistics.median(in_place)
