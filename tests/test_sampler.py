"""ResizableBatchSampler and SeededRandomSampler on their own."""

import pickle

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from epochwise.datamodules.sampler import (
    ResizableBatchSampler,
    SeededRandomSampler,
    close_loader,
    epoch_seed,
    resizable_copy,
)


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


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_counts_a_final_batch_that_fits_exactly(drop_last):
    bs = ResizableBatchSampler(SequentialSampler(range(12)), batch_size=5, drop_last=drop_last)
    bs.plan = lambda i: [4, 4, 4, 9][i]  # 12 samples: three full batches, nothing left
    assert len(bs) == 3 == len(list(bs))
    bs.plan = lambda i: [4, 4, 5, 5][i]  # the third one is short by one
    assert len(bs) == (2 if drop_last else 3) == len(list(bs))


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


def test_start_batch_skips_the_trained_part_once_and_len_counts_the_epoch():
    bs = ResizableBatchSampler(SequentialSampler(range(10)), batch_size=3)
    bs.plan = lambda i: i + 1  # 1, 2, 3, 4 -> [0], [1, 2], [3, 4, 5], [6, 7, 8, 9]
    bs.start_batch = 2
    assert list(bs) == [[3, 4, 5], [6, 7, 8, 9]] and len(bs) == 4
    assert len(list(bs)) == 4  # the offset held for one iteration only


def test_plain_random_sampler_is_never_touched_and_order_is_seed_and_epoch():
    inner = RandomSampler(range(50))
    before = dict(inner.__dict__)

    def order(seed, epoch):
        bs = ResizableBatchSampler(inner, batch_size=10, seed=seed)
        bs.set_epoch(epoch)
        return list(bs)

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2) and order(3, 1) != order(4, 1)
    assert sorted(sum(order(3, 1), [])) == list(range(50))
    assert inner.__dict__ == before and inner.generator is None


def test_without_seed_a_random_sampler_is_iterated_as_it_is():
    torch.manual_seed(0)
    a = list(ResizableBatchSampler(RandomSampler(range(20)), batch_size=5))
    torch.manual_seed(0)
    b = list(ResizableBatchSampler(RandomSampler(range(20)), batch_size=5))
    assert a == b  # the global RNG decides, as for a plain BatchSampler


def test_set_epoch_forwards_to_distributed_sampler():
    ds = list(range(8))
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=0)
    bs = ResizableBatchSampler(sampler, batch_size=2)
    bs.set_epoch(5)
    assert sampler.epoch == 5
    assert torch.tensor(sum(list(bs), [])).unique().numel() == 4


def test_drives_a_stream_and_has_no_length():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(100))

    loader = DataLoader(Stream(), batch_size=4)
    bs = ResizableBatchSampler(loader.batch_sampler.sampler, batch_size=4)
    bs.plan = lambda i: 2 + i
    it = iter(bs)
    assert [len(next(it)) for _ in range(3)] == [2, 3, 4]
    with pytest.raises(TypeError):
        len(bs)


def test_seeded_random_sampler_is_a_function_of_seed_and_epoch_only():
    s = SeededRandomSampler(range(30), seed=5)
    first = list(s)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(s) == first
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(second) == list(range(30))
    assert list(pickle.loads(pickle.dumps(s))) == second
    assert isinstance(s, RandomSampler)  # Lightning treats the loader as shuffled
    assert list(SeededRandomSampler(range(30), seed=6)) != first


def test_epoch_seed_mixes_seed_and_epoch():
    pairs = {(s, e) for s in range(20) for e in range(20)}
    assert len({epoch_seed(s, e) for s, e in pairs}) == len(pairs)


def test_resizable_copy_leaves_the_original_and_keeps_class_and_settings():
    class MyLoader(DataLoader):
        pass

    original = MyLoader(list(range(10)), batch_size=4, shuffle=True, drop_last=True)
    before = dict(original.__dict__)
    twin = resizable_copy(original, seed=1)
    assert type(twin) is MyLoader and original.__dict__ == before
    assert isinstance(twin.batch_sampler, ResizableBatchSampler) and twin.batch_sampler.drop_last
    assert twin.batch_sampler.sampler is original.sampler
    twin.batch_sampler.batch_size = 3
    assert [len(b) for b in twin] == [3, 3, 3] and [len(b) for b in original] == [4, 4]


def test_resizable_copy_refuses_what_it_cannot_resize_and_close_stops_workers():
    with pytest.raises(TypeError, match="batch_size=None"):
        resizable_copy(DataLoader(list(range(4)), batch_size=None))
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True)
    twin = resizable_copy(loader)
    list(twin)
    workers = twin._iterator._workers
    close_loader(twin)
    assert twin._iterator is None and not any(w.is_alive() for w in workers)


def test_order_hook_decides_the_epoch_its_length_and_a_resume_skips_within_it():
    inner = RandomSampler(range(10))
    bs = ResizableBatchSampler(inner, batch_size=3, seed=0)
    asked = []

    def order(epoch):
        asked.append(epoch)
        return None if epoch == 0 else [9, 1, 8, 2, 7][: 3 + epoch]

    bs.order = order
    assert sorted(sum(list(bs), [])) == list(range(10)) and len(bs) == 4  # None: the sampler's own order
    bs.set_epoch(1)
    assert list(bs) == [[9, 1, 8], [2]] and len(bs) == 2
    bs.set_epoch(2)
    bs.plan = lambda i: 2
    bs.start_batch = 1
    assert list(bs) == [[8, 2], [7]] and len(bs) == 3  # batch 0 ([9, 1]) already trained
    assert set(asked) == {0, 1, 2}
