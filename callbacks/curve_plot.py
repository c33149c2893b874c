"""The one learning-curve figure: loss and accuracy per epoch, and what the callbacks changed.

Epochs are counted from 0, as ``trainer.current_epoch``, the checkpoints and the progress bar count
them. The loss axis is logarithmic (the first epoch's loss would otherwise flatten the range that
matters); the best epoch and the stop are marked with their reason; a third panel shows the batch
size, the learning rate and the image size whenever a callback changed them during the fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

__all__ = ["plot_learning_curves", "changed_series"]


def changed_series(controlled: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The controlled values that took more than one value during the fit (the ones worth a panel).

    Example:
        >>> changed_series({"batch size": [16, 16, 32], "lr": [0.1, 0.1, 0.1]})
        {'batch size': [16, 16, 32]}
    """
    out = {}
    for name, values in controlled.items():
        finite = {v for v in values if v is not None and math.isfinite(v)}
        if len(finite) > 1:
            out[name] = list(values)
    return out


def _finite_positive(values: Sequence[float]) -> bool:
    return any(v is not None and math.isfinite(v) and v > 0 for v in values)


def plot_learning_curves(
    history: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str | None = None,
    epochs: Sequence[int] | None = None,
    controlled: Mapping[str, Sequence[float]] | None = None,
    best: tuple[int, str] | None = None,
    stop: tuple[int, str] | None = None,
) -> str:
    """Write the learning-curve PNG and return its path.

    Args:
        history: per-epoch ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc`` and
            ``val_loss_ema`` (dashed); NaN marks an epoch without the metric.
        path: the PNG to write (written to a temporary name and moved into place).
        title: the figure's title.
        epochs: the epoch (0-based) of each entry; default ``0, 1, 2, ...``.
        controlled: per-epoch values callbacks control (``"batch size"``, ``"lr"``,
            ``"image size"``); a third panel shows those that changed.
        best: ``(epoch, label)`` of the best epoch, marked on the loss panel.
        stop: ``(epoch, reason)`` of an early stop, marked on every panel (the reason goes into
            the title).

    Example:
        >>> import tempfile, os
        >>> p = plot_learning_curves({"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7]},
        ...                          os.path.join(tempfile.mkdtemp(), "curves.png"), best=(1, "val_loss 0.7"))
        >>> os.path.getsize(p) > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    changed = changed_series(controlled or {})
    panels = 3 if changed else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    length = max((len(v) for v in history.values()), default=0)
    xs = list(epochs) if epochs is not None else list(range(length))
    for ax, kind in zip(axes[:2], ("loss", "acc"), strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = list(history.get(f"{split}_{kind}", []))
            if values:
                ax.plot(xs[: len(values)], values, style, markersize=3, label=split)
        ema = list(history.get("val_loss_ema", [])) if kind == "loss" else []
        if ema:
            ax.plot(xs[: len(ema)], ema, "--", color="black", alpha=0.6, label="val (EMA)")
        if kind == "loss":
            if _finite_positive(list(history.get("train_loss", [])) + list(history.get("val_loss", []))):
                ax.set_yscale("log")
            if best is not None:
                ax.axvline(best[0], color="grey", linestyle=":", label=f"best: epoch {best[0]}, {best[1]}")
        ax.set_ylabel("loss (log scale)" if kind == "loss" else "accuracy")
        ax.set_title("Loss" if kind == "loss" else "Accuracy")
    if changed:
        ax = axes[2]
        lr = changed.pop("lr", None)
        for name, values in changed.items():
            ax.step(xs[: len(values)], values, where="post", label=name)
        if changed:
            ax.set_ylabel(" / ".join(changed))
        if lr is not None:
            lr_ax = ax.twinx() if changed else ax  # the LR alone: on the panel's own axis
            lr_ax.step(xs[: len(lr)], lr, where="post", color="tab:red", label="lr")
            lr_ax.set_yscale("log")
            lr_ax.set_ylabel("learning rate (log scale)", color="tab:red")
            if lr_ax is not ax:
                lr_ax.legend(loc="upper right", fontsize=8)
        ax.set_title("What the callbacks changed")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if stop is not None:
            ax.axvline(stop[0], color="tab:red", linestyle="--", alpha=0.7,
                       label=f"stopped at epoch {stop[0]}" if ax is axes[0] else None)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right" if ax is axes[0] else "lower right" if ax is axes[1] else "upper left")
    if stop is not None:
        title = f"{title} | {stop[1]}" if title else stop[1]
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
