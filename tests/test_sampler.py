"""ResizableBatchSampler on its own."""

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from epochwise.datamodules.sampler import ResizableBatchSampler


def test_sizes_len_and_drop_last():
    bs = ResizableBatchSampler(SequentialSampler(range(10)), batch_size=4)
    assert [len(b) for b in bs] == [4, 4, 2] and len(bs) == 3
    assert sum(bs, []) == list(range(10))
    bs.drop_last = True
    assert [len(b) for b in bs] == [4, 4] and len(bs) == 2
    bs.plan = lambda i: [3, 5, 4][i % 3]
    assert [len(b) for b in bs] == [3, 5] and len(bs) == 2
    bs.drop_last = False
    assert [len(b) for b in bs] == [3, 5, 2] and len(bs) == 3


def test_change_mid_iteration_takes_effect_at_next_batch():
    bs = ResizableBatchSampler(SequentialSampler(range(20)), batch_size=2)
    it = iter(bs)
    first = next(it)
    bs.batch_size = 5
    assert len(first) == 2 and len(next(it)) == 5


def test_bad_plan_value_is_loud():
    bs = ResizableBatchSampler(SequentialSampler(range(4)), batch_size=2)
    bs.plan = lambda i: 0
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        list(bs)


def test_adopt_in_place_keeps_loader_and_settings():
    loader = DataLoader(list(range(10)), batch_size=3, shuffle=True, drop_last=True)
    original = loader.batch_sampler
    adopted = ResizableBatchSampler.adopt(original, seed=7)
    assert adopted is original and loader.batch_sampler is adopted
    assert isinstance(loader.batch_sampler, ResizableBatchSampler) and adopted.drop_last
    adopted.batch_size = 4
    assert [len(b) for b in loader] == [4, 4]
    assert ResizableBatchSampler.adopt(adopted) is adopted


def test_adopt_refuses_custom_batch_samplers():
    class Bucketing(BatchSampler):
        pass

    with pytest.raises(TypeError, match="custom batch sampler"):
        ResizableBatchSampler.adopt(Bucketing(SequentialSampler(range(4)), 2, False))


def test_set_epoch_reseeds_random_sampler_deterministically():
    def order(epoch):
        bs = ResizableBatchSampler(RandomSampler(range(50)), batch_size=10, seed=3)
        bs.set_epoch(epoch)
        return list(bs)

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_set_epoch_forwards_to_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    ds = list(range(8))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    bs = ResizableBatchSampler(sampler, batch_size=2)
    bs.set_epoch(5)
    assert sampler.epoch == 5
    assert torch.tensor(sum(list(bs), [])).unique().numel() == 4
