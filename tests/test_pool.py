"""The output pool (numbabn/_pool.py): large outputs reuse memory only once nothing can
read it, stay bounded, are safe across threads, and every element of a reused buffer is
written (a reused buffer holds the previous call's values, where fresh pages were zero).
"""

import os
import threading

import numpy as np
import pytest

import numbabn as nbn
from numbabn import _pool

import reference

SHAPE = (16, 32, 32, 32)  # 2 MiB of float32: over _pool.MIN_BYTES
NBYTES = int(np.prod(SHAPE)) * 4


def _address(a):
    return a.__array_interface__["data"][0]


def _fresh():
    return _pool.empty(SHAPE, np.float32)


def test_a_dropped_output_is_reused_and_aligned():
    a = _fresh()
    where = _address(a)
    del a
    b = _fresh()
    assert _address(b) == where and where % _pool.ALIGN == 0


def _holders(a):
    """Ways a caller keeps reading an output after dropping the array itself."""
    yield "slice", a[::2]
    yield "transpose", a.T
    yield "reshape", a.reshape(-1)
    yield "memoryview", memoryview(a)
    yield "as_strided", np.lib.stride_tricks.as_strided(a, (4,), (4,))
    yield "dlpack", np.from_dlpack(a)
    try:
        import torch
    except ImportError:
        return
    yield "torch.from_numpy", torch.from_numpy(a)


@pytest.mark.parametrize("holder", [name for name, _ in _holders(np.empty((2, 2)))])
def test_never_handed_out_while_anything_still_reads_it(holder):
    a = _fresh()
    where = _address(a)
    kept = dict(_holders(a))[holder]
    del a
    others = [_fresh() for _ in range(3)]
    assert all(_address(o) != where for o in others), holder
    del kept, others
    assert _address(_fresh()) == where


def test_numpy_api_outputs_come_from_the_pool_and_are_fully_written():
    """Poison the pool's buffers with NaN, then check every operation and layout writes
    every element of its output (a NaN left behind would show)."""
    rng = np.random.default_rng(3)
    for shape, axis in ((SHAPE, -1), (SHAPE, 1), ((2048, 256), -1), ((256, 2048), 0)):
        x = rng.standard_normal(shape).astype(np.float32)
        for _ in range(2):
            poison = [_pool.empty(shape, np.float32) for _ in range(4)]
            for p in poison:
                p.fill(np.nan)
            poisoned = {_address(p) for p in poison}
            del poison, p
            y, stats = nbn.batch_norm_train(x, axis=axis)
            yi = nbn.batch_norm_inference(x, None, None, stats.mean, stats.var, axis=axis)
            dx, _, _ = nbn.batch_norm_backward(x, x, None, stats, axis=axis)
            for name, out in (("train", y), ("inference", yi), ("backward", dx)):
                assert _address(out) in poisoned, (shape, axis, name)
                assert np.isfinite(out).all(), (shape, axis, name)
            want = reference.train(x.astype(np.float64), None, None, axis, 1e-3)[0]
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
            del y, yi, dx


def test_memory_stays_bounded(monkeypatch):
    """Many sizes over a small cap: the pool forgets its oldest owners; repeated calls of
    one size reuse one buffer (10,000 calls, RSS does not grow)."""
    monkeypatch.setattr(_pool, "CAP_BYTES", 8 * NBYTES)
    for k in range(1, 41):  # sizes the pool has not seen: each adds an owner and trims
        a = _pool.empty((NBYTES // 4 + 1024 * k,), np.float32)
        del a
        assert _pool.held_bytes() <= 8 * NBYTES + 2 * NBYTES
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)

    def rss():
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    for _ in range(100):
        nbn.batch_norm_train(x)
    before = rss()
    for _ in range(10_000):
        nbn.batch_norm_inference(x, None, None, np.zeros(32), np.ones(32))
    assert rss() - before < 4 * NBYTES, (before, rss())


def test_concurrent_callers_never_share_a_buffer():
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(SHAPE).astype(np.float32) + i for i in range(4)]
    wants = [nbn.batch_norm_train(x)[0].copy() for x in xs]
    results, errors = {}, []

    def work(i):
        try:
            held = []
            for _ in range(20):
                y, _ = nbn.batch_norm_train(xs[i])
                held.append(y)
                if len(held) > 2:
                    held.pop(0)
                if not np.array_equal(y, wants[i]):
                    errors.append(i)
            results[i] = held
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    live = [_address(y) for held in results.values() for y in held]
    assert len(set(live)) == len(live)
    for i, held in results.items():
        for y in held:
            np.testing.assert_array_equal(y, wants[i])


def test_outputs_over_half_the_cap_are_not_kept(monkeypatch):
    monkeypatch.setattr(_pool, "CAP_BYTES", 3 * NBYTES)
    held = _pool.held_bytes()
    a = _pool.empty((2 * NBYTES // 4,), np.float32)  # 2/3 of the cap
    assert a.base is None  # its own memory, not a view of a pool owner
    del a
    assert _pool.held_bytes() == held


def test_trimming_among_owners_of_one_size(monkeypatch):
    """Several owners of one size, some in use, trimmed past a lowered cap (an owner is
    found by identity: comparing arrays with == is ambiguous)."""
    size = NBYTES // 4 + 8192  # a size no other test uses: this test's owners alone
    held = [_pool.empty((size,), np.float32) for _ in range(3)]
    del held[1]  # the middle owner is free, the first still in use
    monkeypatch.setattr(_pool, "CAP_BYTES", _pool.held_bytes() - NBYTES // 2)
    _pool.empty((size + 1024,), np.float32)  # a new size: adds an owner and trims
    assert _pool.held_bytes() <= _pool.CAP_BYTES + NBYTES
    for y in held:
        y.fill(1.0)  # still valid memory
