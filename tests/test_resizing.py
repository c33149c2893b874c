"""Progressive resizing: the pure function, the pure schedules (tables) and the callback (behaviour
read from inside ``training_step``), resume, LR coupling and plain DataLoaders."""

from __future__ import annotations

import math
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from epochwise.callbacks.batch_size import BatchSizeWarmup
from epochwise.callbacks.lr import LRScaling
from epochwise.callbacks.resizing import (
    ContinuousResizeSchedule,
    ProgressiveResizing,
    ResizeStage,
    StagedResizeSchedule,
    coupled_batch_size,
    resize_batch,
)

from conftest import MemoryLogger

pytestmark = [
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]

FULL = 16  # side of the test images
N = 64  # training samples
BATCH = 8  # the loader's batch size (at full size)


# ---------------------------------------------------------------------------------------------
# resize_batch
# ---------------------------------------------------------------------------------------------
def test_resize_batch_bilinear_antialiased_when_downsampling():
    x = torch.rand(3, 2, 32, 32)
    out = resize_batch(x, 16)
    assert out.shape == (3, 2, 16, 16)
    ref = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(out, ref)
    plain = resize_batch(x, 16, antialias=False)
    assert torch.equal(plain, F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    assert not torch.equal(out, plain)
    up = resize_batch(x, (40, 36))
    assert up.shape == (3, 2, 40, 36)
    assert torch.equal(up, F.interpolate(x, size=(40, 36), mode="bilinear", align_corners=False))


def test_resize_batch_center_crop_and_identity():
    x = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    out = resize_batch(x, (2, 4), mode="crop")
    assert torch.equal(out, x[:, :, 2:4, 2:6])
    assert resize_batch(x, (6, 8)) is x  # already at size: no copy
    # a constant image stays constant whatever the mode
    c = torch.full((1, 3, 10, 10), 0.25)
    assert torch.allclose(resize_batch(c, 4), torch.full((1, 3, 4, 4), 0.25))


def test_resize_batch_reduced_precision_on_cpu():
    x = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    out = resize_batch(x, 8)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    "images,size,mode,match",
    [
        (torch.rand(3, 8, 8), 4, "resize", "4-D"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 4, "resize", "floating"),
        ([[1.0]], 4, "resize", "torch.Tensor"),
        (torch.rand(2, 1, 8, 8), 0, "resize", "size"),
        (torch.rand(2, 1, 8, 8), (4, 4, 4), "resize", "size"),
        (torch.rand(2, 1, 8, 8), 4.0, "resize", "size"),
        (torch.rand(2, 1, 8, 8), 4, "nearest", "mode"),
        (torch.rand(2, 1, 8, 8), 10, "crop", "fit inside"),
    ],
)
def test_resize_batch_errors(images, size, mode, match):
    with pytest.raises(ValueError, match=match):
        resize_batch(images, size, mode=mode)


# ---------------------------------------------------------------------------------------------
# pure schedules
# ---------------------------------------------------------------------------------------------
def test_staged_schedule_table_and_no_mutation():
    given = [[0, 16, 256], [3, 24], [6, 32, 64]]
    s = StagedResizeSchedule(given)
    assert given == [[0, 16, 256], [3, 24], [6, 32, 64]]
    assert [s(e) for e in range(9)] == [16, 16, 16, 24, 24, 24, 32, 32, 32]
    assert [s.batch_size(e) for e in range(9)] == [256] * 3 + [None] * 3 + [64] * 3
    assert s.stage_at(100) == ResizeStage(6, 32, 64)
    assert s.has_batch_sizes and not StagedResizeSchedule([(0, 8)]).has_batch_sizes
    with pytest.raises(ValueError, match="epoch"):
        s(-1)


@pytest.mark.parametrize(
    "stages,match",
    [
        ([], "non-empty"),
        ("0,16", "non-empty"),
        ({0: 16}, "non-empty"),
        ([(1, 16)], "epoch 0"),
        ([(0, 16), (3, 24), (3, 32)], "increase strictly"),
        ([(0, 16), (5, 24), (3, 32)], "increase strictly"),
        ([(0, 0)], "image_size"),
        ([(0, 16.0)], "image_size"),
        ([(-1, 16)], "start_epoch"),
        ([(0, 16, 0)], "batch_size"),
        ([(0,)], r"stages\[0\]"),
        ([(0, 16, 8, 1)], r"stages\[0\]"),
    ],
)
def test_staged_schedule_validation(stages, match):
    with pytest.raises(ValueError, match=match):
        StagedResizeSchedule(stages)


def _reference_scale(p: float, initial: float, finetune: float, delay: float) -> float:
    # written independently of the implementation: piecewise linear through three points
    if p < delay:
        return initial
    end = 1.0 - finetune
    if p >= end:
        return 1.0
    return initial + (1.0 - initial) * (p - delay) / (end - delay)


@pytest.mark.parametrize("initial,finetune,delay", [(0.5, 0.2, 0.5), (0.25, 0.1, 0.0), (0.6, 0.0, 0.3), (1.0, 0.2, 0.2)])
@pytest.mark.parametrize("increment", [1, 4, 8])
@pytest.mark.parametrize("full", [7, 9, 28, 32, 224])
def test_continuous_schedule_exhaustive(initial, finetune, delay, increment, full):
    s = ContinuousResizeSchedule(initial, finetune, delay, increment)
    for k in range(0, 121):
        p = k / 100
        scale = _reference_scale(p, initial, finetune, delay)
        assert s.scale(p) == pytest.approx(scale, abs=1e-12)
        size = s.size(p, full)
        if scale >= 1.0:
            assert size == full
        else:
            assert size == max(min(increment, full), min(full, math.floor(full * scale / increment + 0.5) * increment))
            assert size % increment == 0 or size == full
        assert 1 <= size <= full


def test_continuous_schedule_composer_defaults_table():
    s = ContinuousResizeSchedule()  # initial 0.5, finetune 0.2, delay 0.5, increment 4
    assert (s.initial_scale, s.finetune_fraction, s.delay_fraction, s.size_increment) == (0.5, 0.2, 0.5, 4)
    ps = [0.0, 0.25, 0.49, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.79, 0.8, 0.9, 1.0]
    assert [s.size(p, 32) for p in ps] == [16, 16, 16, 16, 20, 20, 24, 28, 28, 32, 32, 32, 32]
    assert [s.size(p, 224) for p in (0.0, 0.6, 0.7, 0.8)] == [112, 148, 188, 224]


def test_continuous_schedule_jump_without_ramp():
    s = ContinuousResizeSchedule(initial_scale=0.5, finetune_fraction=0.5, delay_fraction=0.5)
    assert [s.size(p, 32) for p in (0.0, 0.49, 0.5, 0.9)] == [16, 16, 32, 32]


def test_continuous_schedule_small_images_never_empty():
    s = ContinuousResizeSchedule(initial_scale=0.05, size_increment=8)
    assert s.size(0.0, 32) == 8  # 1.6 px would round to 0: at least one increment
    assert s.size(0.0, 6) == 6  # image smaller than the increment: never above full


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(initial_scale=0.0), "initial_scale"),
        (dict(initial_scale=1.5), "initial_scale"),
        (dict(initial_scale=float("nan")), "initial_scale"),
        (dict(finetune_fraction=-0.1), "finetune_fraction"),
        (dict(delay_fraction=1.1), "delay_fraction"),
        (dict(delay_fraction=0.6, finetune_fraction=0.5), r"delay_fraction` \+ `finetune_fraction"),
        (dict(size_increment=0), "size_increment"),
        (dict(size_increment=4.0), "size_increment"),
    ],
)
def test_continuous_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinuousResizeSchedule(**kwargs)


def test_coupled_batch_size_table():
    assert [coupled_batch_size(64, 32, s) for s in (32, 28, 24, 20, 16, 8)] == [64, 84, 114, 164, 256, 1024]
    assert coupled_batch_size(64, (32, 48), (16, 24)) == 256
    assert coupled_batch_size(64, 32, 16, max_batch=100) == 100
    assert coupled_batch_size(3, 32, 64, min_batch=2) == 2  # upsampling shrinks the batch
    with pytest.raises(ValueError, match="base_batch"):
        coupled_batch_size(0, 32, 16)
    with pytest.raises(ValueError, match="max_batch"):
        coupled_batch_size(8, 32, 16, min_batch=4, max_batch=2)


# ---------------------------------------------------------------------------------------------
# the callback: construction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stages=[(0, 8)], initial_scale=0.5), "either `stages`"),
        (dict(mode="nearest"), "mode"),
        (dict(input_key=1.5), "input_key"),
        (dict(couple_batch_size="yes"), "couple_batch_size"),
        (dict(stages=[(0, 8, 32)], couple_batch_size=False), "couple_batch_size=True"),
        (dict(full_size=0), "full_size"),
        (dict(min_batch_size=0), "min_batch_size"),
        (dict(min_batch_size=8, max_batch_size=4), "max_batch_size"),
        (dict(max_per_device=0), "max_per_device"),
        (dict(initial_scale=2.0), "initial_scale"),
        (dict(stages=[(2, 8)]), "epoch 0"),
    ],
)
def test_callback_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveResizing(**kwargs)


def test_callback_pickles():
    pr = ProgressiveResizing(stages=[(0, 8), (2, 16)])
    clone = pickle.loads(pickle.dumps(pr))
    assert clone.schedule == pr.schedule


# ---------------------------------------------------------------------------------------------
# the callback: behaviour read from inside training_step
# ---------------------------------------------------------------------------------------------
class TinyImageModule(pl.LightningModule):
    """conv -> global pool -> linear; records what every step saw."""

    def __init__(self, lr: float = 0.1, key: int | str = 0, with_val: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 10)
        self.lr = lr
        self.key = key
        self.with_val = with_val
        self.train_seen: list[tuple[int, int, tuple[int, ...], float]] = []
        self.val_seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))

    def _xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch[self.key], batch["label"]
        return batch[0], batch[1]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._xy(batch)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.train_seen.append((self.current_epoch, batch_idx, tuple(x.shape), lr))
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = self._xy(batch)
        self.val_seen.append(tuple(x.shape[1:]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def planned(self) -> list[tuple[int, int, int, int]]:
        """(epoch, batch_idx, image side, nominal batch) per step; partial last batches dropped."""
        return [(e, i, s[2], s[0]) for e, i, s, _ in self.train_seen]


def images(n: int = N, size: int = FULL, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g))


def loader(ds: Dataset | None = None, batch_size: int = BATCH, **kwargs: Any) -> DataLoader:
    return DataLoader(ds if ds is not None else images(), batch_size=batch_size, shuffle=True, **kwargs)


def trainer(max_epochs: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, **defaults)


def expected_steps(sizes_by_epoch: list[tuple[int, int]], n: int = N) -> list[tuple[int, int, int, int]]:
    """Per step (epoch, batch_idx, side, batch) for whole epochs with (side, batch) per epoch."""
    out = []
    for epoch, (side, batch) in enumerate(sizes_by_epoch):
        seen, i = 0, 0
        while seen < n:
            b = min(batch, n - seen)
            out.append((epoch, i, side, b))
            seen += b
            i += 1
    return out


def test_staged_coupled_sizes_batches_and_full_size_validation():
    model = TinyImageModule()
    pr = ProgressiveResizing(stages=[(0, 8), (2, 12), (3, 16, 4)])
    log = MemoryLogger()
    val = DataLoader(images(16, seed=1), batch_size=8)
    trainer(4, [pr], logger=log).fit(model, loader(), val)
    # 8 px: 8 x (16/8)^2 = 32; 12 px: round(8 x 256/144) = 14; 16 px: the stage's own 4
    assert model.planned() == expected_steps([(8, 32), (8, 32), (12, 14), (16, 4)])
    assert set(model.val_seen) == {(1, FULL, FULL)}  # validation is never resized
    # logged at Lightning's cadence (every 50 steps: never in this short fit) and at each change
    size_rows = [(step, m["progressive_resizing/size"]) for step, m in log.rows if "progressive_resizing/size" in m]
    assert size_rows == [(0, 8.0), (4, 12.0), (9, 16.0)]
    assert log.series("progressive_resizing/scale") == [0.5, 0.75, 1.0]
    assert log.series("batch_size/per_device") == [32.0, 14.0, 4.0]


def test_continuous_coupled_size_constant_within_epoch():
    model = TinyImageModule()
    pr = ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.2, delay_fraction=0.2, size_increment=4)
    trainer(5, [pr]).fit(model, loader())
    # progress 0, .2, .4, .6, .8 -> 8, 8, 12, 12, 16 px; batch = round(8 x (16/side)^2)
    table = [(8, 32), (8, 32), (12, 14), (12, 14), (16, 8)]
    assert model.planned() == expected_steps(table)
    sched = ContinuousResizeSchedule(0.5, 0.2, 0.2, 4)
    assert [sched.size(e / 5, FULL) for e in range(5)] == [s for s, _ in table]


def test_continuous_uncoupled_moves_within_epoch_and_keeps_batch():
    model = TinyImageModule()
    pr = ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.2, delay_fraction=0.0,
                             size_increment=2, couple_batch_size=False)
    trainer(2, [pr]).fit(model, loader())
    sched = ContinuousResizeSchedule(0.5, 0.2, 0.0, 2)
    per_epoch = N // BATCH
    expected = [
        (e, i, sched.size((e + i / per_epoch) / 2, FULL), BATCH) for e in range(2) for i in range(per_epoch)
    ]
    assert model.planned() == expected
    assert len({s for e, _, s, _ in expected if e == 0}) > 1  # it did change inside epoch 0


def test_uncoupled_combines_with_batch_size_warmup_and_coupled_refuses():
    model = TinyImageModule()
    pr = ProgressiveResizing(stages=[(0, 8), (1, 16)], couple_batch_size=False)
    trainer(2, [pr, BatchSizeWarmup(start=4, end=16, factor=2, interval=1)]).fit(model, loader())
    assert model.planned() == expected_steps([(8, 4), (16, 8)])
    coupled = ProgressiveResizing(stages=[(0, 8), (1, 16)])
    with pytest.raises(ValueError, match="couple_batch_size=False"):
        trainer(2, [BatchSizeWarmup(start=4, end=16), coupled]).fit(TinyImageModule(), loader())


def test_lr_scaling_follows_the_coupled_batch():
    model = TinyImageModule(lr=0.1)
    pr = ProgressiveResizing(stages=[(0, 8), (1, 12), (2, 16)])
    trainer(3, [pr, LRScaling(rule="linear", base_batch_size=BATCH)]).fit(model, loader())
    planned = {0: 32, 1: 14, 2: 8}
    for epoch, _, shape, lr in model.train_seen:
        assert shape[2] == {0: 8, 1: 12, 2: 16}[epoch]
        assert lr == pytest.approx(0.1 * planned[epoch] / BATCH)  # nominal batch, also on a short last batch


def test_dict_batches_and_max_per_device_accumulation():
    class DictSet(Dataset):
        def __init__(self) -> None:
            self.base = images()

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x, y = self.base[i]
            return {"image": x, "label": y}

    model = TinyImageModule(key="image")
    pr = ProgressiveResizing(stages=[(0, 8), (1, 16)], input_key="image", max_per_device=16)
    t = trainer(2, [pr])
    t.fit(model, DataLoader(DictSet(), batch_size=BATCH))
    # 32 per device wanted at 8 px: 16 x 2 accumulation
    assert model.planned() == expected_steps([(8, 16), (16, 8)])
    assert t.accumulate_grad_batches == 1


class _Flat(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(FULL * FULL), torch.tensor(0)


def _tuple_collate(samples: list) -> tuple:
    xs, ys = zip(*samples, strict=True)
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize(
    "data,kwargs,error,match",
    [
        (_Flat(), dict(full_size=FULL), ValueError, r"\(N, C, H, W\)"),
        (images(16), dict(collate_fn=_tuple_collate), TypeError, "list or a dict"),
        (images(16, size=12), dict(full_size=FULL), ValueError, "full size is 16x16"),
    ],
)
def test_bad_batches_fail_clearly(data, kwargs, error, match):
    full_size = kwargs.pop("full_size", None)
    pr = ProgressiveResizing(stages=[(0, 8)], full_size=full_size)
    with pytest.raises(error, match=match):
        trainer(1, [pr]).fit(TinyImageModule(), DataLoader(data, batch_size=4, **kwargs))


@pytest.mark.parametrize("kwargs", [dict(accumulate_grad_batches=2), dict(precision="bf16-mixed")])
def test_accumulation_and_mixed_precision(kwargs):
    model = TinyImageModule()
    t = trainer(2, [ProgressiveResizing(stages=[(0, 8), (1, 16)])], **kwargs)
    t.fit(model, loader())
    assert model.planned() == expected_steps([(8, 32), (16, 8)])
    assert t.accumulate_grad_batches == kwargs.get("accumulate_grad_batches", 1)


def test_in_memory_datamodule():
    from epochwise.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, image_size=16)
    model = TinyImageModule()
    trainer(1, [ProgressiveResizing(stages=[(0, 8)])], limit_val_batches=2).fit(model, dm)
    n = len(dm.train_set)
    assert model.planned() == expected_steps([(8, 256)], n=n)
    assert set(model.val_seen) == {(1, 16, 16)}


def test_continuous_needs_max_epochs():
    with pytest.raises(ValueError, match="max_epochs"):
        trainer(-1, [ProgressiveResizing()], max_steps=3).fit(TinyImageModule(), loader())


class _StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("coupled", [True, False])
def test_resume_mid_schedule_continues_the_same_sizes(tmp_path, coupled):
    def make_pr() -> ProgressiveResizing:
        return ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.2, delay_fraction=0.2,
                                   size_increment=2, couple_batch_size=coupled, seed=3)

    full = TinyImageModule()
    trainer(5, [make_pr()]).fit(full, loader())

    first = TinyImageModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(5, [make_pr(), _StopAfter(1), ckpt], enable_checkpointing=True).fit(first, loader())
    assert {e for e, *_ in first.train_seen} == {0, 1}
    resumed = TinyImageModule()
    # the resumed loader starts at a different batch size: the checkpoint's base batch wins
    trainer(5, [make_pr(), ModelCheckpoint(dirpath=tmp_path, save_last=True)], enable_checkpointing=True).fit(
        resumed, loader(batch_size=BATCH if not coupled else 4), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert first.planned() + resumed.planned() == full.planned()
    if coupled:  # 8 px at first, so the coupled batch was 4x the loader's
        assert full.planned()[0][3] == 4 * BATCH


def test_finetune_phase_is_exactly_full_size_even_off_the_increment_grid():
    s = ContinuousResizeSchedule(initial_scale=0.5, finetune_fraction=0.3, delay_fraction=0.2, size_increment=4)
    for full in (9, 30, 50, 226):
        assert [s.size(p, full) for p in (0.7, 0.85, 1.0)] == [full] * 3


def test_the_coupled_batch_is_capped_at_the_samples_per_epoch():
    model = TinyImageModule()
    pr = ProgressiveResizing(stages=[(0, 2), (1, 16)])  # 8 x (16/2)^2 = 512 samples wanted
    trainer(2, [pr]).fit(model, loader())
    assert model.planned() == expected_steps([(2, N), (16, BATCH)])


def test_the_capped_coupled_batch_is_the_planned_size_lr_scaling_and_logging_read():
    # the batches hold 64 samples either way; the cap must also be the size the engine plans
    model, log = TinyImageModule(lr=0.1), MemoryLogger()
    pr = ProgressiveResizing(stages=[(0, 2), (1, 16)])  # 8 x (16/2)^2 = 512 wanted, N = 64 samples
    trainer(2, [pr, LRScaling(rule="linear", base_batch_size=BATCH)], logger=log).fit(model, loader())
    assert [(e, s[0], lr) for e, _, s, lr in model.train_seen] == (
        [(0, N, pytest.approx(0.1 * N / BATCH))] + [(1, BATCH, pytest.approx(0.1))] * (N // BATCH)
    )
    assert log.series("batch_size/per_device") == [float(N), float(BATCH)]


def test_resume_uses_the_checkpointed_full_size_without_reading_the_data(tmp_path, monkeypatch):
    import epochwise.callbacks.resizing as resizing

    first = TinyImageModule()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(2, [ProgressiveResizing(stages=[(0, 8), (2, 16)]), _StopAfter(0), ckpt],
            enable_checkpointing=True).fit(first, loader())

    def no_reading(*args, **kwargs):
        raise AssertionError("the full size must come from the checkpoint")

    monkeypatch.setattr(resizing, "_sample_hw", no_reading)
    resumed = TinyImageModule()
    trainer(2, [ProgressiveResizing(stages=[(0, 8), (2, 16)])]).fit(
        resumed, loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.planned() == expected_steps([(8, 32), (8, 32)])[N // 32:]
