"""The batching policy as pure functions over plain data (no asyncio), after TGI's test_next_batch_* cases."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.gateway.batching.policy import BatchLimits, bucket_of, flush_delay, take_batch


@dataclass
class Item:
    name: str
    length: int = 10
    enqueued_at: float = 0.0
    deadline: float = 1e9
    cancelled: bool = False


LIMITS = BatchLimits(max_batch_size=4, max_wait_seconds=0.01, max_batch_tokens=10_000, length_bucket_edges=(16, 32, 64))


def names(items):
    return [i.name for i in items]


def test_bucket_of_edges():
    edges = (16, 32, 64)
    assert [bucket_of(n, edges) for n in (1, 16, 17, 32, 33, 64, 65, 500)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_limits_validate():
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchLimits(max_batch_size=0, max_wait_seconds=0.0, max_batch_tokens=1)
    with pytest.raises(ValueError, match="increasing"):
        BatchLimits(max_batch_size=1, max_wait_seconds=0.0, max_batch_tokens=1, length_bucket_edges=(32, 16))


def test_empty_queue_needs_nothing():
    assert flush_delay([], LIMITS, now=5.0) is None
    plan = take_batch([], LIMITS, now=5.0)
    assert plan.batch == [] and plan.rest == [] and plan.expired == [] and plan.cancelled == []


def test_not_due_before_max_wait_then_due():
    items = [Item("a", enqueued_at=1.0), Item("b", enqueued_at=1.004)]
    delay = flush_delay(items, LIMITS, now=1.005)
    assert delay == pytest.approx(0.005)  # counted from the OLDEST entry, not the newest
    assert flush_delay(items, LIMITS, now=1.010) == 0.0


def test_due_when_a_bucket_fills_max_batch_size():
    items = [Item(str(i), enqueued_at=1.0) for i in range(4)]
    assert flush_delay(items[:3], LIMITS, now=1.0) > 0
    assert flush_delay(items, LIMITS, now=1.0) == 0.0


def test_never_exceeds_max_batch_size_and_keeps_order():
    items = [Item(str(i), enqueued_at=1.0) for i in range(7)]
    plan = take_batch(items, LIMITS, now=2.0)
    assert names(plan.batch) == ["0", "1", "2", "3"]
    assert names(plan.rest) == ["4", "5", "6"]


def test_token_budget_caps_padded_tokens():
    limits = BatchLimits(max_batch_size=32, max_wait_seconds=0.0, max_batch_tokens=100, length_bucket_edges=())
    items = [Item(str(i), length=30) for i in range(5)]
    plan = take_batch(items, limits, now=1.0)
    assert names(plan.batch) == ["0", "1", "2"]  # 3 x 30 = 90 <= 100, a 4th would be 120
    assert names(plan.rest) == ["3", "4"]


def test_single_entry_over_budget_is_still_served():
    limits = BatchLimits(max_batch_size=8, max_wait_seconds=0.0, max_batch_tokens=10, length_bucket_edges=())
    plan = take_batch([Item("long", length=128), Item("x", length=5)], limits, now=1.0)
    assert names(plan.batch) == ["long"]
    assert names(plan.rest) == ["x"]


def test_token_budget_fill_makes_flush_due():
    limits = BatchLimits(max_batch_size=32, max_wait_seconds=10.0, max_batch_tokens=100, length_bucket_edges=())
    items = [Item(str(i), length=50, enqueued_at=1.0) for i in range(2)]
    assert flush_delay(items[:1], limits, now=1.0) > 0
    assert flush_delay(items, limits, now=1.0) == 0.0


def test_expired_and_cancelled_are_separated():
    items = [
        Item("late", deadline=1.0),
        Item("gone", cancelled=True),
        Item("gone-and-late", cancelled=True, deadline=0.5),
        Item("ok"),
    ]
    plan = take_batch(items, LIMITS, now=1.0)
    assert names(plan.expired) == ["late", "gone-and-late"]  # a deadline counts first: the route cancels at it
    assert names(plan.cancelled) == ["gone"]
    assert names(plan.batch) == ["ok"]
    assert plan.rest == []


def test_dead_entries_make_a_pass_due_even_if_nothing_is_live():
    assert flush_delay([Item("gone", cancelled=True, enqueued_at=1.0)], LIMITS, now=1.0) == 0.0
    plan = take_batch([Item("gone", cancelled=True)], LIMITS, now=1.0)
    assert plan.batch == [] and names(plan.cancelled) == ["gone"]


def test_delay_wakes_for_a_deadline_before_max_wait():
    limits = BatchLimits(max_batch_size=8, max_wait_seconds=1.0, max_batch_tokens=10_000)
    items = [Item("a", enqueued_at=0.0, deadline=0.2)]
    assert flush_delay(items, limits, now=0.0) == pytest.approx(0.2)


def test_mixed_lengths_are_grouped_by_bucket():
    items = [
        Item("s1", length=10),
        Item("L1", length=60),
        Item("s2", length=12),
        Item("L2", length=50),
        Item("s3", length=8),
    ]
    first = take_batch(items, LIMITS, now=1.0)
    assert names(first.batch) == ["s1", "s2", "s3"]  # the oldest's bucket only: no short text padded to 60
    second = take_batch(first.rest, LIMITS, now=1.0)
    assert names(second.batch) == ["L1", "L2"]
    assert second.rest == []


def test_oldest_anchors_when_its_wait_is_over_even_if_another_bucket_is_full():
    items = [Item("old-long", length=60, enqueued_at=0.0)] + [
        Item(f"s{i}", length=10, enqueued_at=0.5) for i in range(4)
    ]
    plan = take_batch(items, LIMITS, now=0.5)  # old-long waited 0.5 s > 0.01 s: it goes first (no starvation)
    assert names(plan.batch) == ["old-long"]


def test_full_bucket_goes_first_while_the_oldest_may_still_wait():
    items = [Item("young-long", length=60, enqueued_at=1.0)] + [
        Item(f"s{i}", length=10, enqueued_at=1.0) for i in range(4)
    ]
    assert flush_delay(items, LIMITS, now=1.001) == 0.0
    plan = take_batch(items, LIMITS, now=1.001)
    assert names(plan.batch) == ["s0", "s1", "s2", "s3"]
    assert names(plan.rest) == ["young-long"]


def test_every_entry_lands_in_exactly_one_list():
    items = [
        Item(str(i), length=(i * 7) % 90 + 1, deadline=(0.5 if i % 5 == 0 else 9.0), cancelled=(i % 7 == 0))
        for i in range(40)
    ]
    plan = take_batch(items, LIMITS, now=1.0)
    together = plan.batch + plan.expired + plan.cancelled + plan.rest
    assert sorted(names(together)) == sorted(names(items))
    assert len(plan.batch) <= LIMITS.max_batch_size
