"""Object ids: 16 base62 characters whose first 8 encode the creation time, so they sort by it."""

import itertools
import random
import re
import time

import pytest

from service.conversations.ids import ALPHABET, id_time_ms, new_id

ID = re.compile(r"[0-9A-Za-z]{16}")
BASE = 62
# The last millisecond that 8 base62 characters can hold (in the year 8888).
MAX_MS = BASE**8 - 1


def test_the_alphabet_is_in_byte_order():
    assert "".join(sorted(ALPHABET, key=ord)) == ALPHABET
    assert len(set(ALPHABET)) == BASE


def test_an_id_is_16_base62_characters():
    for _ in range(1000):
        assert ID.fullmatch(new_id())


def test_an_id_encodes_the_clock_by_default():
    before = time.time_ns() // 1_000_000
    object_id = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= id_time_ms(object_id) <= after


@pytest.mark.parametrize(
    ("millis", "prefix"),
    [
        (0, "00000000"),
        (9, "00000009"),
        (10, "0000000A"),
        (35, "0000000Z"),
        (36, "0000000a"),
        (61, "0000000z"),
        (62, "00000010"),
        (MAX_MS, "zzzzzzzz"),
    ],
)
def test_the_time_prefix_is_zero_padded_base62(millis, prefix):
    object_id = new_id(millis)
    assert object_id[:8] == prefix
    assert id_time_ms(object_id) == millis


def test_the_time_round_trips():
    rng = random.Random(7)
    samples = [rng.randrange(MAX_MS + 1) for _ in range(2000)]
    samples += [1_700_000_000_000, time.time_ns() // 1_000_000, MAX_MS]
    for millis in samples:
        assert id_time_ms(new_id(millis)) == millis


def test_a_time_beyond_eight_characters_is_refused():
    with pytest.raises(ValueError, match="width"):
        new_id(MAX_MS + 1)


def boundary_times() -> list[int]:
    """Times around every place where a base62 digit rolls over: 9->A, Z->a, z->carry."""
    times = set()
    for place in range(8):
        unit = BASE**place
        for digit in (10, 36, 62):
            for base in (0, 1_700_000_000_000 // (unit * BASE) * unit * BASE):
                centre = base + digit * unit
                times.update(t for t in (centre - 1, centre, centre + 1) if 0 <= t <= MAX_MS)
    return sorted(times)


def test_ids_sort_bytewise_in_time_order_across_digit_boundaries():
    times = boundary_times()
    assert len(times) > 50
    ids = [new_id(t) for t in times]
    assert sorted(ids, key=str.encode) == ids
    assert len(set(ids)) == len(ids)


def test_ids_sort_bytewise_in_time_order_over_random_times():
    rng = random.Random(11)
    times = sorted({rng.randrange(MAX_MS + 1) for _ in range(5000)})
    ids = [new_id(t) for t in times]
    # Shuffled, then sorted as bytes: back to time order, whatever the random halves say.
    shuffled = ids[:]
    rng.shuffle(shuffled)
    assert sorted(shuffled, key=str.encode) == ids


def test_consecutive_milliseconds_sort_in_order():
    start = 1_700_000_000_000
    ids = [new_id(start + step) for step in range(5000)]
    assert all(a.encode() < b.encode() for a, b in itertools.pairwise(ids))


def test_ten_thousand_ids_in_one_millisecond_are_distinct():
    ids = [new_id(1_700_000_000_000) for _ in range(10_000)]
    assert len(set(ids)) == 10_000
    assert {object_id[:8] for object_id in ids} == {new_id(1_700_000_000_000)[:8]}


def test_the_random_half_uses_the_whole_alphabet():
    tails = "".join(new_id(0)[8:] for _ in range(10_000))
    counts = {char: tails.count(char) for char in ALPHABET}
    # 80,000 characters over 62 symbols: about 1,290 each; a skewed or short alphabet shows.
    assert set(tails) == set(ALPHABET)
    assert min(counts.values()) > 1000
    assert max(counts.values()) < 1600
