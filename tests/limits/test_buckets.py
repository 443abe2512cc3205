"""Token buckets: debit-then-wait for readers that pause, all-or-nothing for
readers that refuse; the bounded table."""
from __future__ import annotations

import pytest

from gridgate.limits.buckets import BoundedTable, TokenBucket


def test_a_full_bucket_lets_a_burst_through_then_paces_to_the_rate():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1, 0.0) == pytest.approx(0.1)        # one reading in debt: a tenth of a second
    assert bucket.take(1, 0.1) == pytest.approx(0.1)        # paid back, and one more taken
    assert bucket.take(1, 1.1) == 0.0                        # refilled (capped at the burst)
    assert bucket.tokens == pytest.approx(4)


def test_sustained_rate_over_a_window_is_the_quota():
    """A reader that sleeps for the wait it is given gets exactly the rate."""
    bucket = TokenBucket(rate=50, burst=1, now=0.0)
    now, taken = 0.0, 0
    while now < 10.0:
        now += bucket.take(1, now)
        taken += 1
    assert taken == pytest.approx(50 * 10, abs=2)


def test_burst_zero_means_one_second_of_rate():
    assert TokenBucket(rate=20, burst=0, now=0.0).burst == 20
    assert TokenBucket(rate=0.5, burst=0, now=0.0).burst == 1.0


def test_a_bucket_needs_a_rate():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)


def test_wait_for_debits_nothing_and_caps_at_the_burst():
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    bucket.take(10, 0.0)
    assert bucket.wait_for(5, 0.0) == pytest.approx(0.5)
    assert bucket.tokens == 0                                # nothing taken by asking
    assert bucket.wait_for(100, 0.0) == pytest.approx(1.0)   # more than it holds: until it is full
    assert bucket.wait_for(5, 0.5) == 0.0


def test_reconfigure_keeps_the_balance_capped_by_the_new_burst():
    bucket = TokenBucket(rate=10, burst=10, now=0.0)
    bucket.take(3, 0.0)
    bucket.reconfigure(rate=100, burst=5)
    assert bucket.tokens == 5 and bucket.rate == 100


def test_bounded_table_drops_the_least_recently_used():
    made = []
    table: BoundedTable[str, list[str]] = BoundedTable(2, lambda k: made.append(k) or [k])
    a = table.get("a")
    table.get("b")
    assert table.get("a") is a               # touched: b is now the oldest
    table.get("c")
    assert len(table) == 2 and table.peek("b") is None and table.peek("a") is a
    assert made == ["a", "b", "c"]
    assert table.pop("a") is a and table.pop("a") is None
