"""The per-process cache of who a token is (ota/identities.py)."""

import time

from blynkota.ota.fleet.identities import DeviceIdentity, IdentityCache


def identity(n: int) -> DeviceIdentity:
    return DeviceIdentity(n, f"token-{n}", project_id=10 + n, user_id=100 + n)


def test_an_identity_is_remembered_until_forgotten():
    cache = IdentityCache()
    assert cache.get("token-1") is None
    cache.put(identity(1))
    assert cache.get("token-1") == identity(1)
    cache.forget("token-1")
    assert cache.get("token-1") is None


def test_entries_expire_after_their_time_to_live():
    cache = IdentityCache(ttl=0.05)
    cache.put(identity(1))
    time.sleep(0.1)
    assert cache.get("token-1") is None


def test_the_oldest_entries_go_first_when_full():
    cache = IdentityCache(size=3)
    for n in range(5):
        cache.put(identity(n))
    assert [cache.get(f"token-{n}") for n in range(5)] == [None, None, *map(identity, (2, 3, 4))]
