from serve_app.inference.result_cache import ByteLRU


def test_bounded_in_bytes_and_least_recently_used_goes_first():
    cache = ByteLRU(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # a is now the most recent
    cache.put("c", b"1234")  # 12 bytes: b goes
    assert cache.get("b") is None and cache.get("a") and cache.get("c")
    assert cache.bytes == 8 and len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 1)


def test_replacing_a_key_and_oversized_values():
    cache = ByteLRU(max_bytes=10)
    cache.put("a", b"123456")
    cache.put("a", b"12")
    assert cache.bytes == 2
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None and cache.get("a") == b"12"
