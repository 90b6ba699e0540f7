"""Code run in fresh interpreters by the determinism and concurrency tests.

Usage: ``python workers.py hashes`` prints one digest per case of every output;
``python workers.py concurrent`` hammers the kernels from 4 threads and checks each
result bitwise against a serial run, then prints the threading layer it used.
"""

import hashlib
import sys
import threading

import numpy as np

import numbabn as nbn

CASES = [((64, 28, 28, 32), -1), ((32, 16, 40, 40), 1), ((100_000, 6), -1),
         ((3, 5, 7), 1), ((2, 3, 70_000), 1)]


def _outputs(shape, axis, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = (1e3 + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)
    y_inf = nbn.batch_norm_inference(x, gamma, beta, stats.mean, stats.var, axis=axis)
    return [y, *stats, dx, dgamma, dbeta, y_inf]


def _digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _half_dtypes():
    """float16, and bfloat16 where ml_dtypes is installed."""
    try:
        import ml_dtypes
    except ImportError:
        return [np.float16]
    return [np.float16, ml_dtypes.bfloat16]


def hashes(dtypes=(np.float32,)):
    import numba
    for dtype in dtypes:
        for shape, axis in CASES:
            print(np.dtype(dtype).name, shape, axis, _digest(_outputs(shape, axis, dtype=dtype)))
    print("threads", numba.get_num_threads())


def concurrent():
    cases = CASES[:3]
    expected = {i: _digest(_outputs(*case, seed=i)) for i, case in enumerate(cases)}
    errors = []

    def work(worker):
        try:
            for rep in range(6):
                i = (worker + rep) % len(cases)
                if _digest(_outputs(*cases[i], seed=i)) != expected[i]:
                    errors.append(f"worker {worker} case {i}: different bits")
        except Exception as exc:  # reported to the parent through stdout
            errors.append(f"worker {worker}: {exc!r}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import numba
    print("layer", numba.threading_layer())
    print("errors", errors)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    {"hashes": hashes, "concurrent": concurrent,
     "hashes-half": lambda: hashes(_half_dtypes())}[sys.argv[1]]()
