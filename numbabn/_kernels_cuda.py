"""CUDA kernels (numba-cuda): the two layouts of ``_kernels_cpu``, on the GPU.

Layouts and access patterns (``_layout`` maps every input onto one of two views):

* rows ``(R, C)``, channels contiguous (NHWC, (N, C)): a block is ``tx x ty`` threads,
  ``tx`` a power of two covering the channels of a tile (``blockIdx.x``), ``ty`` rows
  read at once; ``blockIdx.y`` is a chunk of rows. A warp reads consecutive channels
  of one row: coalesced.
* planes ``(O, C, I)``, each channel a run of ``I`` contiguous elements per outer
  index (NCHW): ``blockIdx.x`` is the channel, ``blockIdx.y`` a chunk of the
  channel's ``O * I`` elements (flattened as ``o * I + i``), threads along ``i``:
  coalesced.

Every thread walks a fixed strided slice of its block's chunk; the geometry comes from
the shape alone (``_cuda.launch_plan``), so results are bitwise reproducible.

Reductions, in two deterministic stages (no float atomics anywhere):

1. each thread accumulates its slice in float64 -- Welford's update for the
   statistics (count, mean, M2), plain sums for the backward -- then the block merges
   its threads' results in shared memory by a fixed tree (level s merges thread
   ``t + s`` into ``t``), and writes one partial per (channel, block) to a global
   ``(C, blocks)`` array;
2. one block per channel merges that channel's partials: thread ``t`` takes partials
   ``t, t + T, ...`` in index order, then the same fixed tree.

Welford + Chan (Chan, Golub & LeVeque's pairwise merge) rather than shifted sums: a
thread's first element serves as its running mean from the start, so the result does
not depend on the data's offset, a constant channel keeps its exact value as mean and 0
as M2 (every delta is exactly 0), and each merge adds non-negative terms only.

All arithmetic is float64 whatever the storage dtype: the kernels are memory-bound, and
every full-size output is its float64 result rounded once. Elements are read with
``widen(x[i])`` and written with ``y[i] = narrow(v, y.dtype)``, the CPU kernels' own
element access (``_half``: generic overloads, which numba-cuda compiles too): float16,
float32 and float64 are read natively and stored by the array's own conversion;
bfloat16 arrives as its int16 bits (Numba has no bfloat16 array type;
``_half.cuda_storage_view``) and is converted in registers by the CPU's conversion
functions, compiled for the GPU from the same source: exact widening, and rounding to
nearest even on the float64 bits (a float32 step would round twice), overflow to inf,
NaN kept NaN. Accumulators start as ``float64(0.0)``: a bare ``0.0`` would type as
float64 when compiled, but under the simulator (plain Python with NumPy 2 scalars) it
would become float32 after adding a float32 element.

Shared-memory sizes must be compile-time constants, so the kernels are built per
threads-per-block by `kernels`, cached. Building them there also keeps this module
importable without numba-cuda (pytest's doctest collection imports every module):
``numba.cuda`` is imported on the first `kernels` call and bound to the module global
``cuda``, where the simulator expects to find it (it swaps the globals that hold
``numba.cuda`` for its per-launch fake module).
"""

import functools
import math
from types import SimpleNamespace

import numba

from ._half import narrow, widen

#: numba.cuda once `kernels` has run (see the module docstring).
cuda = None


@functools.lru_cache(maxsize=None)
def kernels(threads):
    """Every kernel, for blocks of ``threads`` threads (a power of two); compiled lazily,
    at first launch, for the argument types of that launch."""
    global cuda
    from numba import cuda

    T = threads

    @cuda.jit(device=True)
    def _welford(n, mean, m2, v):
        n += 1.0
        delta = v - mean
        mean += delta / n
        m2 += delta * (v - mean)  # delta and (v - new mean) share their sign: never negative
        return n, mean, m2

    @cuda.jit(device=True)
    def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
        """Merge (count, mean, M2) b into a; equal means give delta == 0, exact."""
        if n_b == 0.0:
            return n_a, mean_a, m2_a
        if n_a == 0.0:
            return n_b, mean_b, m2_b
        n = n_a + n_b
        delta = mean_b - mean_a
        mean = mean_a + delta * (n_b / n)
        m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
        return n, mean, m2

    @cuda.jit(device=True)
    def _plane_next(o, i, step, inner):
        """Advance a flattened (o, i) position by ``step``; divides only on a wrap."""
        i += step
        if i >= inner:
            o += i // inner
            i = i % inner
        return o, i

    @cuda.jit(device=True)
    def _tree_moments(sn, sm, s2, t, width, levels_from):
        """Merge shared slots ``t + s*width`` into ``t`` for s = levels_from/2 ... 1."""
        s = levels_from // 2
        while s > 0:
            if t < s * width:
                n, m, m2 = _chan(sn[t], sm[t], s2[t], sn[t + s * width],
                                 sm[t + s * width], s2[t + s * width])
                sn[t] = n
                sm[t] = m
                s2[t] = m2
            cuda.syncthreads()
            s //= 2

    @cuda.jit(device=True)
    def _tree_sums(sa, sb, t, width, levels_from):
        s = levels_from // 2
        while s > 0:
            if t < s * width:
                sa[t] += sa[t + s * width]
                sb[t] += sb[t + s * width]
            cuda.syncthreads()
            s //= 2

    # ------------------------------------------------------------------ statistics

    @cuda.jit
    def stats_rows(x, rows_per_block, pn, pmean, pm2):
        """Stage 1 on (R, C): per (channel, row chunk) count, mean, M2."""
        sn = cuda.shared.array(T, numba.float64)
        sm = cuda.shared.array(T, numba.float64)
        s2 = cuda.shared.array(T, numba.float64)
        R, C = x.shape
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        c = cuda.blockIdx.x * width + tx
        j = cuda.blockIdx.y
        r1 = min(R, (j + 1) * rows_per_block)
        n = numba.float64(0.0)
        mean = numba.float64(0.0)
        m2 = numba.float64(0.0)
        if c < C:
            for r in range(j * rows_per_block + ty, r1, cuda.blockDim.y):
                n, mean, m2 = _welford(n, mean, m2, widen(x[r, c]))
        t = ty * width + tx
        sn[t] = n
        sm[t] = mean
        s2[t] = m2
        cuda.syncthreads()
        _tree_moments(sn, sm, s2, t, width, cuda.blockDim.y)
        if ty == 0 and c < C:
            pn[c, j] = sn[tx]
            pmean[c, j] = sm[tx]
            pm2[c, j] = s2[tx]

    @cuda.jit
    def stats_planes(x, chunk, pn, pmean, pm2):
        """Stage 1 on (O, C, I): per (channel, chunk of O*I) count, mean, M2."""
        sn = cuda.shared.array(T, numba.float64)
        sm = cuda.shared.array(T, numba.float64)
        s2 = cuda.shared.array(T, numba.float64)
        O, C, I = x.shape
        t = cuda.threadIdx.x
        c = cuda.blockIdx.x
        j = cuda.blockIdx.y
        k = j * chunk + t
        k1 = min(O * I, (j + 1) * chunk)
        o = k // I
        i = k - o * I
        n = numba.float64(0.0)
        mean = numba.float64(0.0)
        m2 = numba.float64(0.0)
        while k < k1:
            n, mean, m2 = _welford(n, mean, m2, widen(x[o, c, i]))
            k += T
            o, i = _plane_next(o, i, T, I)
        sn[t] = n
        sm[t] = mean
        s2[t] = m2
        cuda.syncthreads()
        _tree_moments(sn, sm, s2, t, 1, T)
        if t == 0:
            pn[c, j] = sn[0]
            pmean[c, j] = sm[0]
            pm2[c, j] = s2[0]

    @cuda.jit
    def merge_moments(pn, pmean, pm2, mean, var):
        """Stage 2: one block per channel merges its partials; biased variance >= 0."""
        sn = cuda.shared.array(T, numba.float64)
        sm = cuda.shared.array(T, numba.float64)
        s2 = cuda.shared.array(T, numba.float64)
        c = cuda.blockIdx.x
        t = cuda.threadIdx.x
        n = numba.float64(0.0)
        m = numba.float64(0.0)
        m2 = numba.float64(0.0)
        for j in range(t, pn.shape[1], T):
            n, m, m2 = _chan(n, m, m2, pn[c, j], pmean[c, j], pm2[c, j])
        sn[t] = n
        sm[t] = m
        s2[t] = m2
        cuda.syncthreads()
        _tree_moments(sn, sm, s2, t, 1, T)
        if t == 0:
            v = s2[0] / sn[0]
            if v < 0.0:  # rounding only; NaN compares False and propagates
                v = 0.0
            mean[c] = sm[0]
            var[c] = v

    # -------------------------------------------------------------------- backward

    @cuda.jit
    def grad_sums_rows(dy, x, rows_per_block, mean, p1, p2):
        """Stage 1 on (R, C): per (channel, row chunk) sum(dy), sum(dy * (x - mean))."""
        sa = cuda.shared.array(T, numba.float64)
        sb = cuda.shared.array(T, numba.float64)
        R, C = x.shape
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        width = cuda.blockDim.x
        c = cuda.blockIdx.x * width + tx
        j = cuda.blockIdx.y
        r1 = min(R, (j + 1) * rows_per_block)
        a = numba.float64(0.0)
        b = numba.float64(0.0)
        if c < C:
            m = mean[c]
            for r in range(j * rows_per_block + ty, r1, cuda.blockDim.y):
                g = widen(dy[r, c])
                a += g
                b += g * (widen(x[r, c]) - m)
        t = ty * width + tx
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        _tree_sums(sa, sb, t, width, cuda.blockDim.y)
        if ty == 0 and c < C:
            p1[c, j] = sa[tx]
            p2[c, j] = sb[tx]

    @cuda.jit
    def grad_sums_planes(dy, x, chunk, mean, p1, p2):
        """Stage 1 on (O, C, I) views, as ``grad_sums_rows``."""
        sa = cuda.shared.array(T, numba.float64)
        sb = cuda.shared.array(T, numba.float64)
        O, C, I = x.shape
        t = cuda.threadIdx.x
        c = cuda.blockIdx.x
        j = cuda.blockIdx.y
        k = j * chunk + t
        k1 = min(O * I, (j + 1) * chunk)
        o = k // I
        i = k - o * I
        m = mean[c]
        a = numba.float64(0.0)
        b = numba.float64(0.0)
        while k < k1:
            g = widen(dy[o, c, i])
            a += g
            b += g * (widen(x[o, c, i]) - m)
            k += T
            o, i = _plane_next(o, i, T, I)
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        _tree_sums(sa, sb, t, 1, T)
        if t == 0:
            p1[c, j] = sa[0]
            p2[c, j] = sb[0]

    @cuda.jit
    def merge_sums(p1, p2, out1, out2):
        """Stage 2: per-channel sums of the partials, in the fixed order of stage 1."""
        sa = cuda.shared.array(T, numba.float64)
        sb = cuda.shared.array(T, numba.float64)
        c = cuda.blockIdx.x
        t = cuda.threadIdx.x
        a = numba.float64(0.0)
        b = numba.float64(0.0)
        for j in range(t, p1.shape[1], T):
            a += p1[c, j]
            b += p2[c, j]
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        _tree_sums(sa, sb, t, 1, T)
        if t == 0:
            out1[c] = sa[0]
            out2[c] = sb[0]

    # ------------------------------------------------------------ elementwise passes

    @cuda.jit
    def affine_rows(x, rows_per_block, center, scale, offset, y):
        """``y = (x - center[c]) * scale[c] + offset[c]`` on (R, C) views, in float64.

        The centre is subtracted first (not folded into the offset) so that a constant
        channel, where ``x - center`` is exactly 0, gives exactly ``offset``.
        """
        R, C = x.shape
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        j = cuda.blockIdx.y
        if c < C:
            m = center[c]
            s = scale[c]
            b = offset[c]
            for r in range(j * rows_per_block + cuda.threadIdx.y,
                           min(R, (j + 1) * rows_per_block), cuda.blockDim.y):
                y[r, c] = narrow((widen(x[r, c]) - m) * s + b, y.dtype)

    @cuda.jit
    def affine_planes(x, chunk, center, scale, offset, y):
        """As ``affine_rows`` on (O, C, I) views."""
        O, C, I = x.shape
        step = cuda.blockDim.x
        c = cuda.blockIdx.x
        k = cuda.blockIdx.y * chunk + cuda.threadIdx.x
        k1 = min(O * I, (cuda.blockIdx.y + 1) * chunk)
        o = k // I
        i = k - o * I
        m = center[c]
        s = scale[c]
        b = offset[c]
        while k < k1:
            y[o, c, i] = narrow((widen(x[o, c, i]) - m) * s + b, y.dtype)
            k += step
            o, i = _plane_next(o, i, step, I)

    @cuda.jit
    def grad_input_rows(dy, x, rows_per_block, mean, k_dy, mean_dy, k_x, dx):
        """``dx = k_dy[c] * (dy - mean_dy[c]) - k_x[c] * (x - mean[c])`` on (R, C) views."""
        R, C = x.shape
        c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        j = cuda.blockIdx.y
        if c < C:
            m = mean[c]
            a = k_dy[c]
            md = mean_dy[c]
            b = k_x[c]
            for r in range(j * rows_per_block + cuda.threadIdx.y,
                           min(R, (j + 1) * rows_per_block), cuda.blockDim.y):
                dx[r, c] = narrow(a * (widen(dy[r, c]) - md) - b * (widen(x[r, c]) - m),
                                  dx.dtype)

    @cuda.jit
    def grad_input_planes(dy, x, chunk, mean, k_dy, mean_dy, k_x, dx):
        """As ``grad_input_rows`` on (O, C, I) views."""
        O, C, I = x.shape
        step = cuda.blockDim.x
        c = cuda.blockIdx.x
        k = cuda.blockIdx.y * chunk + cuda.threadIdx.x
        k1 = min(O * I, (cuda.blockIdx.y + 1) * chunk)
        o = k // I
        i = k - o * I
        m = mean[c]
        a = k_dy[c]
        md = mean_dy[c]
        b = k_x[c]
        while k < k1:
            dx[o, c, i] = narrow(a * (widen(dy[o, c, i]) - md) - b * (widen(x[o, c, i]) - m),
                                 dx.dtype)
            k += step
            o, i = _plane_next(o, i, step, I)

    # ------------------------------------------------------------ per-channel maths
    # C elements each: one thread per channel. Same formulas as the CPU backend's NumPy
    # expressions, in float64 (IEEE division and square root: no fastmath).

    @cuda.jit
    def norm_coeffs(var, eps, gamma, has_gamma, beta, has_beta, invstd, scale, offset):
        """``invstd = 1 / sqrt(var + eps)``, ``scale = invstd * gamma``, ``offset = beta``."""
        c = cuda.grid(1)
        if c < invstd.shape[0]:
            v = numba.float64(var[c]) + eps
            # NaN for a negative (GPU) moving_var, as NumPy's sqrt on the CPU; the
            # simulator's math.sqrt would raise instead (NaN fails the test too)
            inv = 1.0 / math.sqrt(v) if v >= 0.0 else math.nan
            invstd[c] = inv
            scale[c] = inv * numba.float64(gamma[c]) if has_gamma else inv
            offset[c] = numba.float64(beta[c]) if has_beta else numba.float64(0.0)

    @cuda.jit
    def grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma, has_gamma, n, dgamma, k_dy, mean_dy,
                    k_x):
        """Per-channel factors of the closed-form backward (see ``batch_norm_backward``)."""
        c = cuda.grid(1)
        if c < dgamma.shape[0]:
            inv = invstd[c]
            dg = sum_dy_xmu[c] * inv
            kd = inv * numba.float64(gamma[c]) if has_gamma else inv
            dgamma[c] = dg
            k_dy[c] = kd
            mean_dy[c] = sum_dy[c] / n
            k_x[c] = kd * inv * dg / n

    @cuda.jit
    def to_float64(v, out):
        c = cuda.grid(1)
        if c < out.shape[0]:
            out[c] = widen(v[c])

    @cuda.jit
    def moving_update(moving, batch, momentum):
        """``moving = moving * momentum + batch * (1 - momentum)`` in float64, in place."""
        c = cuda.grid(1)
        if c < moving.shape[0]:
            moving[c] = narrow(widen(moving[c]) * momentum + widen(batch[c]) * (1.0 - momentum),
                               moving.dtype)

    return SimpleNamespace(**{name: fn for name, fn in locals().items()
                              if not name.startswith("_") and hasattr(fn, "py_func")})
