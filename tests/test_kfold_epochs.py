"""scripts/kfold_epochs.py: a k=2, 2-epoch smoke run, the fold split and the argument checks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kfold_epochs.py"


@pytest.fixture(scope="module")
def kfold():
    spec = importlib.util.spec_from_file_location("kfold_epochs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_fold_indices_partition(kfold):
    folds = kfold.fold_indices(103, 5, seed=3)
    assert [len(f) for f in folds] == [21, 21, 21, 20, 20]
    assert sorted(torch.cat(folds).tolist()) == list(range(103))
    assert all(torch.equal(a, b) for a, b in zip(folds, kfold.fold_indices(103, 5, seed=3), strict=True))


def test_summary_rule(kfold):
    rows = [
        {"fold": i + 1, "best_epoch": b, "best_val_loss": 0.1, "val_acc_at_best": 0.9, "stopped_early": i != 2}
        for i, b in enumerate([7, 9, 30, 8, 10])
    ]
    s = kfold.summarize(rows, margin=1.1)
    assert s["median_best_epoch"] == 9 and s["mean_best_epoch"] == pytest.approx(12.8)
    assert s["recommended_max_epochs"] == math.ceil(1.1 * 9) == 10
    assert s["folds_not_stopped"] == [3]


@pytest.mark.parametrize(
    "argv, message",
    [(["--k", "1"], "--k must be >= 2"), (["--margin", "0.9"], "--margin must be >= 1"),
     (["--max-epochs", "0"], "--max-epochs must be >= 1"), (["--threads", "-1"], "--threads must be >= 0")],
)
def test_argument_errors(kfold, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        kfold.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_help(kfold, capsys):
    with pytest.raises(SystemExit) as exc:
        kfold.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "recommended max_epochs" in out
    # the docstring once said "the final run trains on all k folds": the script trains no final run
    assert "trains no final model" in out and "final run trains on all" not in out


def test_training_pool_keeps_uint8_and_augments_training_folds_only(kfold):
    from epochwise.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, image_size=8, augment_shift=1)
    fit_pool, eval_pool = kfold.training_pool(dm)
    assert len(fit_pool) == len(dm.train_set) + len(dm.val_set)
    assert fit_pool.images.dtype == torch.uint8 and fit_pool.images is eval_pool.images
    assert fit_pool.transform.augment_shift == 1 and eval_pool.transform.augment_shift == 0


def test_smoke_k2(kfold, tmp_path, capsys, one_thread):  # one_thread restores the count main() sets
    out = tmp_path / "kfold"
    result = kfold.main(
        ["--k", "2", "--max-epochs", "2", "--patience", "1", "--image-size", "8", "--batch-size", "128",
         "--out", str(out), "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert "recommended max_epochs:" in printed and "best val_loss" in printed
    payload = json.loads((out / "kfold_epochs.json").read_text())
    assert [f["fold"] for f in payload["folds"]] == [1, 2]
    for fold in payload["folds"]:
        assert 1 <= fold["best_epoch"] <= 2 and fold["epochs_run"] <= 2
        assert 0.0 < fold["val_acc_at_best"] <= 1.0 and fold["best_val_loss"] > 0
        assert Path(fold["curves_png"]).is_file()
    summary = payload["summary"]
    assert summary["recommended_max_epochs"] == math.ceil(1.1 * summary["median_best_epoch"])
    assert result["summary"] == summary
    assert sorted(p.name for p in out.iterdir()) == [
        "fold1_learning_curves.png", "fold2_learning_curves.png", "kfold_epochs.json"
    ]  # nothing half-written left behind
