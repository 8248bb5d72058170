"""The glibc allocator settings of skmixed._malloc: what they set, once, and the opt-out."""

import pytest

import skmixed._malloc as malloc_mod
import skmixed._parallel as parallel


class FakeLibc:
    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize("opt_out", [False, True])
def test_share_arena_limits_glibc_to_one_arena_once_unless_opted_out(monkeypatch, opt_out):
    calls = []
    monkeypatch.setattr(malloc_mod, "_ARENA", [])
    monkeypatch.setattr(malloc_mod.sys, "platform", "linux")
    monkeypatch.setattr(malloc_mod.ctypes, "CDLL", lambda name: FakeLibc(calls))
    if opt_out:
        monkeypatch.setenv("SKMIXED_NO_MALLOPT", "1")
    else:
        monkeypatch.delenv("SKMIXED_NO_MALLOPT", raising=False)
    first, second = malloc_mod.share_arena(), malloc_mod.share_arena()
    assert calls == ([] if opt_out else [(-8, 1)])  # M_ARENA_MAX = 1
    assert first is second is (not opt_out)


def test_share_arena_does_nothing_off_linux(monkeypatch):
    calls = []
    monkeypatch.setattr(malloc_mod, "_ARENA", [])
    monkeypatch.setattr(malloc_mod.sys, "platform", "darwin")
    monkeypatch.setattr(malloc_mod.ctypes, "CDLL", lambda name: FakeLibc(calls))
    assert malloc_mod.share_arena() is False and calls == []


def test_engine_shares_the_arena_before_its_thread_pool_only(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel, "share_arena", lambda: calls.append(1))
    with parallel.Engine(n_jobs=1) as one:
        assert list(one.map(lambda c: c * 2, [1, 2, 3])) == [2, 4, 6]
    assert calls == []  # in the calling thread: nothing to set
    with parallel.Engine(n_jobs=2) as two:
        assert list(two.map(lambda c: c * 2, [1, 2, 3])) == [2, 4, 6]
        assert list(two.map(lambda c: c + 1, [1, 2])) == [2, 3]
    assert calls == [1]  # once, when the pool starts
