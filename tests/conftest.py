"""Shared test fixtures: tiny models, tiny data, a quiet Trainer factory."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*treespec.*")
os.environ.setdefault("PYTHONHASHSEED", "0")
# spawned DDP workers start a fresh interpreter: one OpenMP thread each on a 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_dataset(n: int = 100, features: int = 4, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, 2, (n,), generator=g))


class RecordingModule(pl.LightningModule):
    """A linear model that records, from inside training_step, what each step saw.

    ``records`` rows: (epoch, global_step, batch_idx, batch size, lr of group 0, sum of inputs).
    """

    def __init__(self, features: int = 4, lr: float = 0.1, scheduler: str | None = None,
                 loader: DataLoader | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 2)
        self.lr = lr
        self.scheduler = scheduler
        self.loader = loader
        self.records: list[tuple] = []
        self.val_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.records.append((self.current_epoch, self.global_step, batch_idx, int(x.shape[0]), lr, float(x.sum())))
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_sizes.append(int(x.shape[0]))
        loss = torch.nn.functional.cross_entropy(self.layer(x), y)
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler is None:
            return opt
        if self.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        elif self.scheduler == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        elif self.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}
        elif self.scheduler == "onecycle_steps":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=1000)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        else:
            raise ValueError(self.scheduler)
        return {"optimizer": opt, "lr_scheduler": sched}

    def train_dataloader(self) -> DataLoader:
        if self.loader is None:
            raise RuntimeError("no loader given")
        return self.loader

    def sizes_by_epoch(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for epoch, _, _, n, _, _ in self.records:
            out.setdefault(epoch, []).append(n)
        return out


class DestroyProcessGroup(pl.Callback):
    """Ends a spawned DDP fit cleanly: a barrier, then ``torch.distributed.destroy_process_group()``.

    Lightning (2.6) destroys the process group at exit for NCCL only; with gloo the group outlives
    the fit, and its C++ worker threads are still running when the child interpreter finalizes.
    A worker thread drops the last reference to the ``Work`` of the last collective (and so to the
    Python-created tensor in it, e.g. ``reduce_boolean_decision``'s) after the main thread has been
    woken; freeing that tensor's PyObject needs the GIL, and if the main thread reaches
    ``Py_FinalizeEx`` first the worker is ``pthread_exit``-ed inside a noexcept destructor:
    ``terminate called without an active exception``, the child dies with SIGABRT (a race, roughly
    1 run in 4 for a fit whose last collective is a callback's; reproduced with plain
    ``torch.multiprocessing.spawn`` + gloo, no Lightning). Destroying the group before the spawned
    function returns joins those threads while the interpreter is intact. ``teardown`` runs after
    the strategy's teardown and after every collective of the fit; the barrier keeps a rank from
    tearing its connections down while the other is still in the last collective.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def quiet_trainer(tmp_path=None, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, progress bar, summary, checkpoints or sanity validation.

    A DDP strategy (``strategy="ddp_spawn"``...) gets :class:`DestroyProcessGroup` appended to its
    callbacks, so every multi-process test ends its gloo group before the child exits."""
    if str(kwargs.get("strategy", "")).startswith("ddp"):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), DestroyProcessGroup()]
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        max_epochs=3,
        num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread per process: the test models are tiny, and on a 2-core machine two
    OpenMP threads per process (DDP tests run two processes) can slow a run down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset() -> TensorDataset:
    return make_dataset()


from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``rows`` is a list of (step, {name: value})."""

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []
        self._save_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]
