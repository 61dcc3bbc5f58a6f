"""The episodic memories: a ring keeps the last items of each task, a reservoir keeps every
item seen with the same probability, draws are seeded and a state dict resumes them."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsurgery.episodic import ReservoirMemory, RingMemory

# A stream: (task, number of new items) chunks; items are distinct ints in arrival order.
streams = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=15)


def feed(memory, stream):
    seen: dict[int, list[int]] = {}
    counter = 0
    for task, n in stream:
        items = list(range(counter, counter + n))
        counter += n
        memory.add(task, items)
        seen.setdefault(task, []).extend(items)
    return seen


@given(stream=streams, per_task=st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_the_ring_keeps_the_last_items_of_each_task(stream, per_task):
    memory = RingMemory(per_task, seed=0)
    seen = feed(memory, stream)
    assert memory.tasks == list(seen)
    for task, items in seen.items():
        assert memory.items(task) == items[-per_task:]
    assert memory.items() == [i for items in seen.values() for i in items[-per_task:]]
    assert len(memory) == sum(min(len(items), per_task) for items in seen.values())


@given(stream=streams, capacity=st.integers(1, 10), seed=st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_the_reservoir_holds_distinct_seen_items_with_their_tasks(stream, capacity, seed):
    memory = ReservoirMemory(capacity, seed=seed)
    seen = feed(memory, stream)
    total = sum(len(items) for items in seen.values())
    assert memory.seen == total and len(memory) == min(total, capacity)
    stored = memory.items()
    assert len(set(stored)) == len(stored)
    for task in memory.tasks:
        assert set(memory.items(task)) <= set(seen[task])
    if total <= capacity:  # nothing replaced yet
        assert sorted(stored) == list(range(total))


def test_the_reservoir_keeps_every_item_with_the_same_probability():
    # 20 items from two tasks, capacity 5: each is kept with probability 1/4. Over 4000
    # seeded runs the counts must pass a chi-square test of uniformity (19 degrees of
    # freedom; 43.8 is the 0.999 quantile) and each stay within 5 standard deviations.
    runs, items, capacity = 4000, 20, 5
    counts = [0] * items
    for seed in range(runs):
        memory = ReservoirMemory(capacity, seed=seed)
        memory.add("a", list(range(12)))
        memory.add("b", list(range(12, items)))
        for item in memory.items():
            counts[item] += 1
    expected = runs * capacity / items
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 43.8, counts
    std = math.sqrt(runs * (capacity / items) * (1 - capacity / items))
    assert max(abs(c - expected) for c in counts) < 5 * std, counts


@pytest.mark.parametrize(
    "make", [lambda: RingMemory(4, seed=3), lambda: ReservoirMemory(6, seed=3)]
)
def test_draws_are_distinct_seeded_and_resume_from_a_state_dict(make):
    memory = make()
    memory.add(0, list(range(10)))
    memory.add(1, list(range(10, 20)))
    batch = memory.sample(3, task=1)
    assert len(set(batch)) == 3 and set(batch) <= set(memory.items(1))
    assert sorted(memory.sample(100)) == sorted(memory.items())  # all of them if fewer
    again = make()
    again.add(0, list(range(10)))
    again.add(1, list(range(10, 20)))
    assert again.sample(3, task=1) == batch

    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    expected = [memory.sample(2), memory.add(2, [20, 21, 22]), memory.sample(4), memory.items()]
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = [resumed.sample(2), resumed.add(2, [20, 21, 22]), resumed.sample(4), resumed.items()]
    assert got == expected


def test_bad_settings_and_states_are_refused_before_anything_changes():
    with pytest.raises(ValueError, match="per_task"):
        RingMemory(0)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirMemory(-1)
    with pytest.raises(ValueError, match="seed"):
        RingMemory(2, seed=-1)
    ring = RingMemory(2, seed=0)
    with pytest.raises(ValueError, match="no item stored for the memory"):
        ring.sample(1)
    ring.add("a", [1, 2])
    with pytest.raises(ValueError, match="no item stored for task 'b'"):
        ring.sample(1, task="b")
    with pytest.raises(ValueError, match="batch_size"):
        ring.sample(0)
    big = RingMemory(3, seed=0)
    big.add("a", [1, 2, 3])
    with pytest.raises(ValueError, match="larger per_task"):
        ring.load_state_dict(big.state_dict())
    assert ring.items() == [1, 2]
    reservoir = ReservoirMemory(2, seed=0)
    reservoir.add("a", [1])
    state = {**reservoir.state_dict(), "seen": 5}
    with pytest.raises(ValueError, match="holds 1 items after 5 seen"):
        reservoir.load_state_dict(state)
    assert reservoir.seen == 1 and reservoir.items() == [1]
