"""Snapshot ensembles (Huang et al. 2017, "Snapshot Ensembles: Train 1, get M for free").

Cosine learning-rate cycles with restarts; the weights at the end of every cycle are saved as a
snapshot, and the snapshots' averaged softmax predictions form the ensemble.
:func:`snapshot_lr_factor` is the pure schedule (the cosine of :mod:`.schedules`, restarted every
cycle), :func:`evaluate_snapshot_ensemble` the pure evaluation; :class:`SnapshotEnsemble` sets the
one as a factor on the fit's LR path and offers the other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from ._checks import ConfigurationError, check_int, check_number, check_str
from ._logging import CadenceLog, log_dir_of, log_metrics
from .engine import cached_state_key
from .lr_path import LRFactorCallback
from .schedules import cosine_factor

__all__ = ["SnapshotEnsemble", "snapshot_lr_factor", "evaluate_snapshot_ensemble", "load_snapshot_state"]


def snapshot_lr_factor(
    epoch: int, cycle_epochs: int, min_lr_factor: float = 0.0, epoch_fraction: float = 0.0
) -> float:
    """LR multiplier at ``epoch + epoch_fraction``: cosine from 1 down to ``min_lr_factor`` over each
    cycle of ``cycle_epochs`` epochs, restarting at 1 when a new cycle begins.

    ``cosine_factor(t, min_lr_factor)`` of :mod:`~epochwise.callbacks.schedules`, i.e.
    ``min + (1 - min) * (1 + cos(pi * t)) / 2``, with ``t`` the position inside the cycle in
    [0, 1): ``t = (epoch % cycle_epochs + epoch_fraction) / cycle_epochs``.

    Example:
        >>> [round(snapshot_lr_factor(e, cycle_epochs=2), 3) for e in range(5)]
        [1.0, 0.5, 1.0, 0.5, 1.0]
        >>> round(snapshot_lr_factor(1, 2, min_lr_factor=0.1, epoch_fraction=0.5), 4)
        0.2318
    """
    check_int("epoch", epoch, minimum=0)
    check_int("cycle_epochs", cycle_epochs, minimum=1)
    check_number("epoch_fraction", epoch_fraction, 0.0, 1.0, high_inclusive=False)
    return cosine_factor((epoch % cycle_epochs + epoch_fraction) / cycle_epochs, min_lr_factor)


def load_snapshot_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model ``state_dict`` in a snapshot file (this module's format or a Lightning checkpoint)."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _nll(probs: Tensor, targets: Tensor) -> float:
    picked = probs.gather(1, targets.long().view(-1, 1)).squeeze(1)
    return -picked.clamp_min(1e-12).log().mean().item()


def _first_device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate_snapshot_ensemble(
    module: nn.Module,
    snapshot_paths: Sequence[str | os.PathLike],
    dataloader: Iterable[Any],
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Accuracy and NLL of each snapshot and of their ensemble (the mean of their softmax outputs).

    Each snapshot is loaded into ``module`` in turn (eval mode); ``module(inputs)`` must return
    logits and the batches must be ``(inputs, targets, ...)`` in the same order on every pass (no
    shuffling). The module's own weights and train/eval mode are put back afterwards.

    Returns:
        ``{"snapshot_acc": [per snapshot], "ensemble_acc": float, "best_snapshot_acc": float,
        "snapshot_nll": [per snapshot], "ensemble_nll": float, "num_snapshots": int,
        "num_samples": int}``. NLL is the mean negative log-likelihood of the true class; the
        ensemble's is never above the snapshots' mean (Jensen), its accuracy can be below the best
        snapshot's.

    Example:
        >>> import tempfile, os, torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "s0.pt")
        >>> torch.save({"state_dict": net.state_dict()}, path)
        >>> data = [(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))]
        >>> out = evaluate_snapshot_ensemble(net, [path, path], data)
        >>> out["ensemble_acc"] == out["snapshot_acc"][0]
        True
    """
    if not snapshot_paths:
        raise ConfigurationError("`snapshot_paths` must name at least one snapshot, got an empty sequence")
    device = torch.device(device) if device is not None else _first_device(module)
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    was_training = module.training
    targets: Tensor | None = None
    prob_sum: Tensor | None = None
    accs: list[float] = []
    nlls: list[float] = []
    try:
        for path in snapshot_paths:
            module.load_state_dict(load_snapshot_state(path))
            module.eval()
            probs, ys = [], []
            for batch in dataloader:
                x, y = batch[0], batch[1]
                probs.append(module(x.to(device)).float().softmax(-1).cpu())
                ys.append(y.cpu())
            p, y_all = torch.cat(probs), torch.cat(ys)
            if targets is None:
                targets = y_all
            elif not torch.equal(targets, y_all):
                raise ValueError("`dataloader` must yield the same samples in the same order on every pass (no shuffle)")
            accs.append((p.argmax(-1) == y_all).float().mean().item())
            nlls.append(_nll(p, y_all))
            prob_sum = p if prob_sum is None else prob_sum + p
    finally:
        module.load_state_dict(original)
        module.train(was_training)
    if prob_sum is None or targets is None:  # unreachable: at least one snapshot ran
        raise RuntimeError("no snapshot was evaluated")
    mean_probs = prob_sum / len(accs)
    return {
        "snapshot_acc": accs,
        "ensemble_acc": (mean_probs.argmax(-1) == targets).float().mean().item(),
        "best_snapshot_acc": max(accs),
        "snapshot_nll": nlls,
        "ensemble_nll": _nll(mean_probs, targets),
        "num_snapshots": len(accs),
        "num_samples": int(targets.numel()),
    }


class SnapshotEnsemble(LRFactorCallback):
    """Cosine LR cycles with restarts, as a factor on the one LR path; a snapshot of the weights at
    the end of every cycle.

    Before every training batch the factor ``snapshot`` of the fit's
    :class:`~epochwise.callbacks.lr_path.LRPath` is set to :func:`snapshot_lr_factor` of the epoch
    and the fraction of it done (``batch_idx / trainer.num_training_batches``), so every param
    group's LR is its scheduler's LR times the cycle factor times the other factors
    (:class:`~epochwise.callbacks.lr.LRWarmup`, :class:`~epochwise.callbacks.lr.LRScaling`...), in
    whatever order the callbacks are listed. A module LR scheduler keeps stepping on its own,
    unscaled values (return only the optimizer for the paper's pure cycles). The position is
    derived from ``trainer.current_epoch`` and ``batch_idx``, so a resumed run continues the
    same schedule.

    At the end of every ``cycle_epochs``-th epoch (after validation) the LightningModule's
    ``state_dict`` is saved as ``{"state_dict", "cycle", "epoch"}`` to ``dirpath/filename``
    (default folder: ``<run folder>/snapshots``; written by rank 0 to a temporary name and moved
    into place; the ranks meet at one barrier per cycle). After ``num_cycles * cycle_epochs``
    epochs the fit is stopped; ``setup`` raises if ``max_epochs`` is smaller than that. Every fit
    starts afresh (``snapshot_paths`` is reset in ``setup``; a resume restores it).

    :meth:`ensemble_test` evaluates the snapshots and their ensemble with
    :func:`evaluate_snapshot_ensemble` on a test loader and logs the accuracies.

    Logged (straight to the loggers, rank 0): by the LR path ``lr/group{j}`` and
    ``lr_factor/snapshot``; at Lightning's cadence and at each new cycle
    ``snapshot_ensemble/cycle``; by :meth:`ensemble_test` ``snapshot_ensemble/snapshot_<i>_acc``,
    ``snapshot_ensemble/ensemble_acc``, ``snapshot_ensemble/best_snapshot_acc`` and
    ``snapshot_ensemble/ensemble_nll``.

    Attributes:
        snapshot_paths: files saved in this fit, in cycle order (checkpointed).
        results: the last :meth:`ensemble_test` result.

    Args:
        cycle_epochs: epochs per cycle (>= 1).
        num_cycles: cycles, i.e. snapshots (>= 1).
        dirpath: folder for the snapshots (default: ``<run folder>/snapshots``).
        min_lr_factor: LR factor at the end of each cycle, in [0, 1].
        filename: snapshot file name, a format string with ``{cycle}`` (0-based).

    Raises:
        ConfigurationError: for an argument out of range, naming it.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> snap = SnapshotEnsemble(cycle_epochs=4, num_cycles=3, min_lr_factor=0.01)
        >>> trainer = Trainer(callbacks=[snap], max_epochs=12, logger=False)
        >>> snap.total_epochs, round(snap.lr_factor_at(epoch=3, fraction=0.5), 4)
        (12, 0.0477)
    """

    factor_name = "snapshot"

    def __init__(
        self,
        cycle_epochs: int,
        num_cycles: int,
        dirpath: str | os.PathLike | None = None,
        min_lr_factor: float = 0.0,
        filename: str = "snapshot_{cycle}.pt",
    ) -> None:
        super().__init__()
        check_int("cycle_epochs", cycle_epochs, minimum=1)
        check_int("num_cycles", num_cycles, minimum=1)
        check_number("min_lr_factor", min_lr_factor, 0.0, 1.0)
        check_str("filename", filename)
        if "{cycle" not in filename:
            raise ConfigurationError(f"`filename` must be a format string containing '{{cycle}}', got {filename!r}")
        try:
            filename.format(cycle=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigurationError(f"`filename` must format with only `cycle`, got {filename!r} ({err})") from None
        self.cycle_epochs = cycle_epochs
        self.num_cycles = num_cycles
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.min_lr_factor = float(min_lr_factor)
        self.filename = filename
        self.snapshot_paths: list[str] = []
        self.results: dict[str, Any] | None = None
        self._log = CadenceLog(watch=("snapshot_ensemble/cycle",))

    @property
    def total_epochs(self) -> int:
        return self.cycle_epochs * self.num_cycles

    @property
    def state_key(self) -> str:
        return cached_state_key(self, cycle_epochs=self.cycle_epochs, num_cycles=self.num_cycles)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs != -1 and max_epochs < self.total_epochs:
            raise ConfigurationError(
                f"SnapshotEnsemble needs {self.num_cycles} cycles x {self.cycle_epochs} epochs ="
                f" {self.total_epochs} epochs, but the Trainer has max_epochs={max_epochs}; set"
                f" Trainer(max_epochs={self.total_epochs}) or more (the callback stops the fit itself)."
            )
        super().setup(trainer, pl_module, stage)
        self.snapshot_paths = []  # per fit; a checkpoint's list is loaded after setup
        self.results = None
        self._log.reset()

    def lr_factor_at(self, epoch: int, fraction: float = 0.0) -> float:
        """The cycle's LR factor at ``epoch + fraction`` (``fraction`` clipped below 1)."""
        return snapshot_lr_factor(epoch, self.cycle_epochs, self.min_lr_factor, min(max(fraction, 0.0), 0.999999))

    def lr_factor(self, trainer: pl.Trainer, batch_idx: int) -> float:
        """The factor for ``batch_idx`` of the current epoch (epoch granularity if its length is unknown)."""
        batches = float(trainer.num_training_batches)
        fraction = batch_idx / batches if math.isfinite(batches) and batches > 0 else 0.0
        return self.lr_factor_at(trainer.current_epoch, fraction)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._log(trainer, {"snapshot_ensemble/cycle": float(trainer.current_epoch // self.cycle_epochs)})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.cycle_epochs == 0:
            cycle = epoch // self.cycle_epochs
            if cycle < self.num_cycles:
                self._save(trainer, pl_module, cycle, epoch)
        if epoch + 1 >= self.total_epochs:
            trainer.should_stop = True

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, cycle: int, epoch: int) -> None:
        folder = self.dirpath or os.path.join(log_dir_of(trainer), "snapshots")
        path = os.path.join(folder, self.filename.format(cycle=cycle))
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
            tmp = f"{path}.tmp"
            torch.save({"state_dict": state, "cycle": cycle, "epoch": epoch}, tmp)
            os.replace(tmp, path)
        trainer.strategy.barrier("SnapshotEnsemble._save")  # once per cycle: others wait for the file
        self.snapshot_paths = [p for p in self.snapshot_paths if p != path] + [path]

    def ensemble_test(
        self,
        trainer: pl.Trainer | None,
        pl_module: nn.Module,
        dataloader: Iterable[Any] | None = None,
        datamodule: pl.LightningDataModule | None = None,
    ) -> dict[str, Any]:
        """Evaluate the snapshots and their ensemble on ``dataloader`` (else the datamodule's
        ``test_dataloader()``, which must be set up) and log the accuracies through ``trainer``.

        Returns :func:`evaluate_snapshot_ensemble`'s dict (also kept in :attr:`results`).
        """
        if dataloader is None:
            if datamodule is None:
                raise ConfigurationError("pass `dataloader` or `datamodule` (got neither)")
            dataloader = datamodule.test_dataloader()
        if not self.snapshot_paths:
            raise RuntimeError("SnapshotEnsemble has no snapshots yet: run trainer.fit first")
        self.results = evaluate_snapshot_ensemble(pl_module, self.snapshot_paths, dataloader)
        if trainer is not None:
            metrics = {f"snapshot_ensemble/snapshot_{i}_acc": a for i, a in enumerate(self.results["snapshot_acc"])}
            metrics["snapshot_ensemble/ensemble_acc"] = self.results["ensemble_acc"]
            metrics["snapshot_ensemble/best_snapshot_acc"] = self.results["best_snapshot_acc"]
            metrics["snapshot_ensemble/ensemble_nll"] = self.results["ensemble_nll"]
            log_metrics(trainer, metrics)
        return self.results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "snapshot_paths": list(self.snapshot_paths)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.snapshot_paths = list(state_dict.get("snapshot_paths", self.snapshot_paths))
