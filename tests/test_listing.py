"""A site's listing held as 8-byte hashes (pacsgrid.storage.listing.KeySet): it answers
membership like a set of the keys, and holds about 8 bytes per key whatever their length."""

from __future__ import annotations

import random
import tracemalloc

from pacsgrid.storage.listing import KeySet


def object_keys(n: int, salt: str) -> list[str]:
    rng = random.Random(salt)
    root = "1.2.826.0.1.3680043.8.498"
    return [
        f"{root}.{rng.getrandbits(60)}/{root}.{rng.getrandbits(60)}/{root}.{n}{i}.dcm"
        for i in range(n)
    ]


def test_membership_is_that_of_the_keys_given() -> None:
    listed = object_keys(50_000, "listed")
    absent = object_keys(50_000, "absent") + [k + "x" for k in listed[:1000]] + [""]
    keys = KeySet(iter(listed))
    assert len(keys) == len(listed)
    assert all(k in keys for k in listed)
    assert not any(k in keys for k in absent)
    assert 42 not in keys
    assert "" not in KeySet([])


def test_a_listing_of_long_keys_is_held_in_about_eight_bytes_per_key() -> None:
    n = 200_000
    root = "1.2.826.0.1.3680043.8.498"
    tracemalloc.start()
    try:
        # The keys arrive one at a time, as from a site's listing, and are not kept.
        keys = KeySet(f"{root}.{i // 100}/{root}.{i // 10}/{root}.{i}.dcm" for i in range(n))
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(keys) == n
    # A set of these keys holds about 190 bytes per key.
    assert held / n < 10, held / n
    assert peak / n < 12, peak / n
