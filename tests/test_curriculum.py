"""CurriculumSampling: every epoch trains on exactly the easiest pool the pacing function gives (each
sample once), in a seeded order, with the batch growing with the pool; difficulty from given scores
or from the model's own per-sample losses of the previous epochs; identical on resume."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from epochwise.callbacks import CurriculumPacing, CurriculumSampling
from epochwise.callbacks.curriculum_schedules import curriculum_batch_size
from epochwise.datamodules.text import GeneratedTextDataModule

from conftest import MemoryLogger, RecordingModule, quiet_trainer

N = 60


def indexed(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, torch.randint(0, 2, (n,), generator=g))


SCORES = torch.randn(N, generator=torch.Generator().manual_seed(5)).tolist()


class Boom(Exception):
    pass


class Curious(RecordingModule):
    """Records (epoch, step, batch_idx, size, sample indices) and, with ``per_sample``, returns and
    records the per-sample losses (index -> loss, in the order trained)."""

    def __init__(self, per_sample: bool = False, crash_at=None):
        super().__init__(lr=0.5)
        self.layer = torch.nn.Linear(3, 2)
        self.per_sample, self.crash_at = per_sample, crash_at
        self.losses: list[tuple[int, int, float]] = []  # (epoch, index, loss)

    def training_step(self, batch, batch_idx):
        if (self.current_epoch, batch_idx) == self.crash_at:
            raise Boom()
        x, y = batch
        indices = [int(i) for i in x[:, 0].tolist()]
        self.records.append((self.current_epoch, self.global_step, batch_idx, len(indices), indices))
        losses = torch.nn.functional.cross_entropy(self.layer(x[:, 1:]), y, reduction="none")
        if not self.per_sample:
            return losses.mean()
        self.losses += [(self.current_epoch, i, float(v)) for i, v in zip(indices, losses.detach().tolist())]
        return {"loss": losses.mean(), "per_sample_loss": losses}

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(batch[0][:, 1:]), batch[1]))

    def by_epoch(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for epoch, *_, indices in self.records:
            out.setdefault(epoch, []).extend(indices)
        return out


def fit(callback, module=None, loader_batch=8, val=None, **kwargs):
    module = module or Curious()
    logger = MemoryLogger()
    trainer = quiet_trainer(callbacks=[callback], logger=logger, log_every_n_steps=1, **{"max_epochs": 5, **kwargs})
    trainer.fit(module, train_dataloaders=DataLoader(indexed(), batch_size=loader_batch, shuffle=True),
                val_dataloaders=val)
    return module, logger


def easiest(scores, k):
    return set(sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k])


def test_each_epoch_is_the_easiest_pool_once_with_the_batch_growing_with_it():
    module, logger = fit(CurriculumSampling(SCORES, start_fraction=0.25, full_at=0.6, seed=1))
    pacing = CurriculumPacing(0.25, 0.6)
    epochs = module.by_epoch()
    for epoch, trained in epochs.items():
        pool = math.ceil(pacing.fraction(epoch / 5) * N - 1e-9)
        assert sorted(trained) == sorted(easiest(SCORES, pool)), epoch  # the pool, each sample once
        batch = curriculum_batch_size(pacing.fraction(epoch / 5), 0.25, 2, 8)
        sizes = [n for e, _, _, n, _ in module.records if e == epoch]
        assert sizes == [batch] * (pool // batch) + ([pool % batch] if pool % batch else []), epoch
    assert len(epochs[0]) == 15  # the easiest quarter only
    assert sorted(epochs[3]) == sorted(epochs[4]) == list(range(N))  # pacing at 1: every sample once
    assert epochs[3] != epochs[4]  # reshuffled each epoch
    assert logger.series("curriculum/pool")[0] == 15 and logger.series("curriculum/fraction")[-1] == 1.0
    assert logger.series("batch_size/per_device")[0] == 2


def test_the_order_is_a_function_of_seed_and_epoch_and_unshuffled_goes_easy_to_hard():
    a, _ = fit(CurriculumSampling(SCORES, seed=1), max_epochs=2)
    b, _ = fit(CurriculumSampling(SCORES, seed=1), max_epochs=2)
    c, _ = fit(CurriculumSampling(SCORES, seed=2), max_epochs=2)
    assert a.by_epoch() == b.by_epoch() != c.by_epoch()
    d, _ = fit(CurriculumSampling(SCORES, start_fraction=0.5, shuffle=False), max_epochs=1)
    assert d.by_epoch()[0] == sorted(range(N), key=lambda i: (SCORES[i], i))[:30]


def expected_loss_pools(module, pacing, epochs):
    """The pool of each epoch from the losses the module itself recorded: the easiest by the last
    loss seen of each sample (unscored: hardest); epoch 0 is all the data."""
    scores = [math.inf] * N
    pools = {}
    for epoch in range(epochs):
        k = N if epoch == 0 else math.ceil(pacing.fraction(epoch / epochs) * N - 1e-9)
        pools[epoch] = easiest(scores, k)
        for e, i, value in module.losses:
            if e == epoch:
                scores[i] = value
    return pools


@pytest.mark.parametrize("with_validation", [False, True])
def test_difficulty_from_the_models_own_per_sample_losses_of_the_previous_epochs(with_validation):
    val = DataLoader(indexed(8), batch_size=8) if with_validation else None
    kwargs = {"val_check_interval": 0.5} if with_validation else {}  # losses also read mid-epoch
    module, _ = fit(CurriculumSampling("loss", start_fraction=0.3, full_at=0.8, seed=0),
                    module=Curious(per_sample=True), val=val, **kwargs)
    pools = expected_loss_pools(module, CurriculumPacing(0.3, 0.8), 5)
    for epoch, trained in module.by_epoch().items():
        assert sorted(trained) == sorted(pools[epoch]), epoch
    assert len(module.by_epoch()[0]) == N and len(module.by_epoch()[1]) == math.ceil(N * (0.3 + 0.7 / 4))


@pytest.mark.parametrize("difficulty", ["scores", "loss"])
def test_a_mid_epoch_resume_trains_the_same_samples_in_the_same_order(difficulty, tmp_path):
    def run(folder, crash_at=None, ckpt=None, seed=0):
        torch.manual_seed(seed)
        module = Curious(per_sample=difficulty == "loss", crash_at=crash_at)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1, save_top_k=0)
        callback = CurriculumSampling(SCORES if difficulty == "scores" else "loss", start_fraction=0.3, full_at=0.6)
        trainer = quiet_trainer(callbacks=[callback, checkpoint], max_epochs=4, enable_checkpointing=True,
                                default_root_dir=tmp_path / folder)
        try:
            trainer.fit(module, train_dataloaders=DataLoader(indexed(), batch_size=8, shuffle=True), ckpt_path=ckpt)
        except Boom:
            pass
        return module.records

    full = run("full")
    part = run("part", crash_at=(1, 2))
    resumed = run("part", ckpt=str(tmp_path / "part" / "last.ckpt"), seed=9)  # another global seed
    assert part + resumed == full  # epochs, steps, sizes and the very samples, in order


def test_what_a_curriculum_cannot_order_is_refused_before_training():
    module = Curious()
    cases = [
        (CurriculumSampling(SCORES[:10]), {}, r"10 scores but the train data set has 60"),
        (CurriculumSampling("loss"), {}, r"per_sample_loss"),
        (CurriculumSampling(SCORES), {"max_epochs": -1, "max_steps": 5}, r"max_epochs"),
    ]
    for callback, kwargs, match in cases:
        for kind in (MisconfigurationException, ValueError):
            with pytest.raises(kind, match=match):
                fit(callback, module=module, **kwargs)
    assert all(e == 0 and i == 0 for e, _, i, *_ in module.records)  # at most the batch that shows the outputs
    with pytest.raises(ValueError, match="stream"):
        dm = GeneratedTextDataModule(seq_len=4, batch_size=2, val_windows=4)
        quiet_trainer(callbacks=[CurriculumSampling("loss")], max_epochs=2).fit(module, datamodule=dm)
    for bad in ({"difficulty": "hard"}, {"difficulty": [1.0, float("nan")]}, {"difficulty": [1.0], "full_at": 0}):
        with pytest.raises(ValueError):
            CurriculumSampling(**bad)


def test_image_classifier_returns_per_sample_losses_for_a_loss_curriculum():
    from epochwise.modules import ImageClassifier

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 10, (24,), generator=g))
    model = ImageClassifier(per_sample_loss=True)
    callback = CurriculumSampling("loss", start_fraction=0.5, full_at=1.0)
    quiet_trainer(callbacks=[callback], max_epochs=2).fit(model, train_dataloaders=DataLoader(data, batch_size=8))
    scores = callback.state_dict()["scores"]
    assert scores.shape == (24,) and bool(torch.isfinite(scores).all())  # every sample scored in epoch 0
    assert callback.state_dict()["samples_seen"] == 24 + 18  # then the easiest 75% (t = 1/2)
