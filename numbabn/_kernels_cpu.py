"""Numba CPU kernels: plain loops over 2-D and 3-D views, writing into given outputs.

Two layouts cover every input (``_layout`` maps an array and its channel axis to one):

* rows ``(R, C)``: channels are the contiguous axis (NHWC, (N, C)). A task owns a block
  of rows and all channels; the inner loop runs over channels and vectorizes. Fewer than
  ``config.FOLD_ROWS_BELOW`` channels make too short a loop: such a view arrives folded,
  (R / g, g * C) (`fold_rows`), and the rows kernels tile the per-channel vectors to its
  width and merge each channel's g columns (C is the vectors' length, never the view's).
* planes ``(O, C, I)``: each channel is a run of ``I`` contiguous elements per outer
  index (NCHW). A reduction task owns one channel over a block of the ``(O, I)`` plane
  and keeps ``config.LANES`` accumulators so the inner loop vectorizes without
  reassociation; an elementwise task owns one run (or a segment of it), numbered in
  memory order.

Reductions write one partial result per task into ``(n_tasks_per_channel, C)`` arrays
and merge them in index order after the parallel loop. The split comes from the shape
(``_layout``), so results are bitwise independent of the thread count. No kernel uses
an implicit ``prange`` reduction on floats, and no ``fastmath``: the order of every
floating-point sum is fixed by the code.

All arithmetic is in float64, whatever the storage dtype: the kernels are
memory-bound, so the wider arithmetic is free and the float32 outputs are correctly
rounded results of float64 computations. Elements are read with ``widen`` and written
with ``narrow`` (``_half``): plain casts for float32 and float64 arrays; for float16 and
bfloat16, which arrive as views of their bits (uint16 and int16), conversions in
registers with one rounding per output. bfloat16 outputs of the elementwise passes are
staged: about 512 elements (whole rows, or part of a run) computed into a float64 block,
then written by ``_half.narrow_block`` (a rounding without the selects for NaN and
subnormals, redone exactly for the rare block that needs them): same bits, 1.4-1.6x the
throughput. Numba compiles each kernel once per storage
dtype, so one source serves all four, with the same task split and so the same
guarantees (determinism across thread counts, constant channel -> beta).
"""

import threading
import types as types_module

import numba
import numpy as np
from numba import carray, cfunc, njit, prange, types
from numba.extending import overload
from numpy.lib.stride_tricks import as_strided

from . import _cache
from ._half import narrow, narrow_block, staged_dtype, widen
from .config import (CHUNK_ELEMENTS, FOLD_ROW_WIDTH, FOLD_ROWS_BELOW, LANES, MAX_CHUNKS,
                     SHORT_RUN)

_OPTS = dict(cache=True, nogil=True)
# the whole operations: a negative moving variance gives NaN (as the stock layers), not an error
_OPS_OPTS = dict(_OPTS, error_model="numpy")


# --------------------------------------------------------------------------- merges

@njit(**_OPTS)
def _merge_moments(counts, pmean, pm2, mean, var):
    """Merge per-task (count, mean, M2) into per-channel mean and biased variance.

    Chan, Golub & LeVeque's pairwise update, applied in task order: for partials a and
    b, ``delta = mean_b - mean_a``, ``mean = mean_a + delta * n_b / n`` and
    ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``. Equal means give ``delta == 0``, so
    a constant channel keeps its exact mean and a zero M2.
    """
    ntasks, C = pmean.shape
    for c in range(C):
        n_a = counts[0]
        mean_a = pmean[0, c]
        m2_a = pm2[0, c]
        for k in range(1, ntasks):
            n_b = counts[k]
            n = n_a + n_b
            delta = pmean[k, c] - mean_a
            mean_a += delta * (n_b / n)
            m2_a += pm2[k, c] + delta * delta * (n_a * (n_b / n))
            n_a = n
        mean[c] = mean_a
        var[c] = m2_a / n_a


@njit(**_OPTS)
def _sum_partials(psum, out):
    ntasks, C = psum.shape
    for c in range(C):
        s = 0.0
        for k in range(ntasks):
            s += psum[k, c]
        out[c] = s


@njit(**_OPTS)
def _shifted_to_moments(n, shift, s1, s2):
    """(count, sum(x-K), sum((x-K)**2)) -> (mean, M2) of one task; M2 is never negative."""
    m = s1 / n
    m2 = s2 - s1 * m
    if m2 < 0.0:  # rounding only; NaN compares False and propagates
        m2 = 0.0
    return shift + m, m2


@njit(**_OPTS)
def _tiled(v, W):
    """The per-channel vector ``v`` repeated to the ``W`` columns of a (folded) rows
    view, as float64 (a copy of ``v`` where W is its size)."""
    out = np.empty(W)
    C = v.size
    for j in range(W):
        out[j] = v[j % C]
    return out


# ----------------------------------------------------------------------- statistics

@njit(parallel=True, **_OPTS)
def stats_rows(x, rows_per_task, mean, var):
    """Per-column mean and biased variance of ``x`` (R, C); see ``_merge_moments``.

    Each task accumulates shifted sums over its rows in float64 with the shift K set to
    the task's first row, converts them to (mean, M2) and the tasks merge with Chan's
    rule. With K a sample of the same channel, ``sum((x-K)**2) - sum(x-K)**2 / n`` cancels
    only about ``((mean-K)/std)**2`` units of float64 rounding, so data with a large
    mean (1e4 + N(0, 1) in float32) keep a float64-accurate variance in one pass.

    A folded view (``x`` (R / g, g * C) for C = ``mean.size`` channels, see
    `fold_rows`) gives g partial results per task, one per column of each channel;
    they merge per channel in the order of the columns, task after task.
    """
    R, W = x.shape
    C = mean.size
    ntasks = row_tasks(R, rows_per_task)
    counts = np.empty(ntasks * (W // C))
    pmean = np.empty((ntasks, W))
    pm2 = np.empty((ntasks, W))
    for k in prange(ntasks):
        stats_rows_task(x, k, rows_per_task, counts, pmean, pm2)
    _merge_moments(counts, pmean.reshape(counts.size, C), pm2.reshape(counts.size, C), mean,
                   var)


@njit(**_OPTS)
def row_tasks(R, rows_per_task):
    """Tasks of a rows pass (reductions and elementwise alike): blocks of rows."""
    return (R + rows_per_task - 1) // rows_per_task


@njit(**_OPTS)
def task_rows(k, rows_per_task, R):
    """Rows ``[r0, r1)`` of task ``k`` of a rows pass over ``R`` rows (`row_tasks`)."""
    r0 = k * rows_per_task
    return r0, min(R, r0 + rows_per_task)


@njit(**_OPTS)
def stats_rows_task(x, k, rows_per_task, counts, pmean, pm2):
    """Task ``k`` of `stats_rows`: its (count, mean, M2) of each column into ``pmean[k]``
    and ``pm2[k]``, the count into its ``g`` entries of ``counts`` (g partial results
    per task on a folded view: ``counts.size`` is g times the tasks)."""
    R, C = x.shape
    r0, r1 = task_rows(k, rows_per_task, R)
    g = counts.size // row_tasks(R, rows_per_task)
    s1 = pmean[k]
    s2 = pm2[k]
    s1[:] = 0.0
    s2[:] = 0.0
    shift = np.empty(C)
    for c in range(C):
        shift[c] = widen(x[r0, c])
    for r in range(r0, r1):
        xr = x[r]
        for c in range(C):
            d = widen(xr[c]) - shift[c]
            s1[c] += d
            s2[c] += d * d
    n = np.float64(r1 - r0)
    counts[k * g:(k + 1) * g] = n
    for c in range(C):
        s1[c], s2[c] = _shifted_to_moments(n, shift[c], s1[c], s2[c])


@njit(**_OPTS)
def _plane_task(t, C, O, I, o_per, i_per):
    """Task t -> (channel, task index within the channel, o0, o1, i0, i1)."""
    n_o = (O + o_per - 1) // o_per
    n_i = (I + i_per - 1) // i_per
    c = t // (n_o * n_i)
    j = t % (n_o * n_i)
    o0 = (j // n_i) * o_per
    i0 = (j % n_i) * i_per
    return c, j, o0, min(O, o0 + o_per), i0, min(I, i0 + i_per)


@njit(parallel=True, **_OPTS)
def stats_planes(x, o_per, i_per, mean, var):
    """Per-channel mean and biased variance of ``x`` (O, C, I); as ``stats_rows``.

    A task reduces one channel over an ``o_per x i_per`` block with the block's first
    element as shift, in ``LANES`` float64 accumulators summed in lane order. (Runs
    shorter than ``LANES`` leave most accumulators idle: the whole operations of
    ``train_short`` use ``stats_short_runs`` instead.) A run is swept two ``LANES``
    vectors at a time, each lane's two terms added before its accumulator: one load and
    store of the accumulators per 128 elements (float32, both versions in one process in
    turns: 1.06-1.30x on one thread, 1.01-1.26x on two, (64, 64, 56, 56) included). Not
    taken elsewhere (README, "Kernels"): four rows per sweep in the rows statistics ran
    0.41-0.76x once the input outgrew the caches, two in the rows gradient sums 2.3x slower
    at 256 channels, two vectors in the planes gradient sums 0.90-1.11x.
    """
    O, C, I = x.shape
    n_j = plane_parts(O, I, o_per, i_per)
    counts = np.empty(n_j)
    pmean = np.empty((n_j, C))
    pm2 = np.empty((n_j, C))
    for t in prange(C * n_j):
        stats_planes_task(x, t, o_per, i_per, counts, pmean, pm2)
    _merge_moments(counts, pmean, pm2, mean, var)


@njit(**_OPTS)
def plane_parts(O, I, o_per, i_per):
    """Partial results per channel of a planes reduction (its tasks: ``C`` times this)."""
    return ((O + o_per - 1) // o_per) * ((I + i_per - 1) // i_per)


@njit(**_OPTS)
def stats_planes_task(x, t, o_per, i_per, counts, pmean, pm2):
    """Task ``t`` of `stats_planes`: one channel's (count, mean, M2) over one block."""
    O, C, I = x.shape
    c, j, o0, o1, i0, i1 = _plane_task(t, C, O, I, o_per, i_per)
    shift = widen(x[o0, c, i0])
    a1 = np.zeros(LANES)
    a2 = np.zeros(LANES)
    for o in range(o0, o1):
        xr = x[o, c, i0:i1]  # 1-D slices vectorize; 3-D indexing in the loop did not
        n_vec = (xr.size // LANES) * LANES
        n_two = (xr.size // (2 * LANES)) * 2 * LANES
        for i in range(0, n_two, 2 * LANES):  # two vectors per sweep: see the docstring
            xl = xr[i:i + LANES]
            xm = xr[i + LANES:i + 2 * LANES]
            for l in range(LANES):
                d = widen(xl[l]) - shift
                e = widen(xm[l]) - shift
                a1[l] += d + e
                a2[l] += d * d + e * e
        for i in range(n_two, n_vec, LANES):
            xl = xr[i:i + LANES]
            for l in range(LANES):
                d = widen(xl[l]) - shift
                a1[l] += d
                a2[l] += d * d
        for l in range(xr.size - n_vec):
            d = widen(xr[n_vec + l]) - shift
            a1[l] += d
            a2[l] += d * d
    s1 = 0.0
    s2 = 0.0
    for l in range(LANES):
        s1 += a1[l]
        s2 += a2[l]
    n = np.float64((o1 - o0) * (i1 - i0))
    if c == 0:
        counts[j] = n
    pmean[j, c], pm2[j, c] = _shifted_to_moments(n, shift, s1, s2)


def _columns(x):
    """(O, C, I) whose channels follow each other at the run's stride, as (O, C * I):
    a reshape of a C-contiguous array (kept C-typed: Numba vectorizes the loops over it,
    2x faster than over the same memory typed as any-layout), else ``as_strided``."""
    raise NotImplementedError("compiled code only")


@overload(_columns, inline="always")
def _columns_impl(x):
    if x.layout == "C":
        return lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2])
    return lambda x: as_strided(x, shape=(x.shape[0], x.shape[1] * x.shape[2]),
                                strides=(x.strides[0], x.strides[2]))


#: columns a short-run reduction task sweeps at a time (three float64 vectors of it,
#: 12 KiB, stay in L1; the order of each column's sum is unchanged)
_TILE = 512


@njit(**_OPTS)
def _per_column(v, I):
    """Per-channel ``v`` repeated for each of a channel's I columns."""
    out = np.empty(v.size * I)
    for c in range(v.size):
        out[c * I:(c + 1) * I] = v[c]
    return out


@njit(**_OPTS)
def stats_short_runs(x2, I, rows_per_task, mean, var):
    """``stats_planes`` for runs shorter than ``LANES`` (4x4, 2x2 feature maps), where
    one channel per task leaves most lanes idle (NCHW ran 2-7x slower than NHWC at
    I = 16 and 4), on ``x2``, the (O, C * I) view of `_columns`.

    As ``stats_rows``: a task takes whole rows and accumulates shifted sums per column,
    but every column of a channel uses the channel's shift (its first element in the
    task), so a task adds its channel's I columns before it converts to (mean, M2) once
    per channel; tasks merge with Chan's rule as everywhere.

    Not ``parallel``, and only in ``train_short``, which ``_cpu`` picks, and the compiled
    ops (``stats_short``, an entry point of its own, on the calling thread): short runs are
    mostly small inputs, which run serially anyway (``config.SERIAL_BELOW``), and inside
    ``stats_planes`` (a parfor) they made the op's parallel entry points take 35.6 s
    instead of 21.4 s to compile with a cold cache. One thread through whole images is
    about as fast as two through the planes path.
    """
    O, CI = x2.shape
    C = CI // I
    ntasks = row_tasks(O, rows_per_task)
    counts = np.empty(ntasks)
    pmean = np.empty((ntasks, C))
    pm2 = np.empty((ntasks, C))
    for k in range(ntasks):
        r0, r1 = task_rows(k, rows_per_task, O)
        s1 = np.zeros(CI)
        s2 = np.zeros(CI)
        shift = np.empty(CI)
        for c in range(C):
            first = widen(x2[r0, c * I])
            for i in range(I):
                shift[c * I + i] = first
        for j0 in range(0, CI, _TILE):  # accumulators of a tile stay in L1
            j1 = min(CI, j0 + _TILE)
            t1 = s1[j0:j1]
            t2 = s2[j0:j1]
            ts = shift[j0:j1]
            for r in range(r0, r1):
                xr = x2[r, j0:j1]
                for j in range(j1 - j0):
                    d = widen(xr[j]) - ts[j]
                    t1[j] += d
                    t2[j] += d * d
        n = np.float64((r1 - r0) * I)
        counts[k] = n
        for c in range(C):
            a = 0.0
            b = 0.0
            for i in range(I):
                a += s1[c * I + i]
                b += s2[c * I + i]
            pmean[k, c], pm2[k, c] = _shifted_to_moments(n, shift[c * I], a, b)
    _merge_moments(counts, pmean, pm2, mean, var)


@njit(**_OPTS)
def grad_sums_short_runs(dy2, x2, I, rows_per_task, mean, sum_dy, sum_dy_xmu):
    """``grad_sums_planes`` for short runs, as `stats_short_runs`: per-column sums over
    whole-row tasks, each channel's I columns added per task, tasks added in order."""
    O, CI = x2.shape
    C = CI // I
    ntasks = row_tasks(O, rows_per_task)
    p1 = np.empty((ntasks, C))
    p2 = np.empty((ntasks, C))
    for k in range(ntasks):
        r0, r1 = task_rows(k, rows_per_task, O)
        s1 = np.zeros(CI)
        s2 = np.zeros(CI)
        m = _per_column(mean, I)
        for j0 in range(0, CI, _TILE):
            j1 = min(CI, j0 + _TILE)
            t1 = s1[j0:j1]
            t2 = s2[j0:j1]
            tm = m[j0:j1]
            for r in range(r0, r1):
                xr = x2[r, j0:j1]
                gr = dy2[r, j0:j1]
                for j in range(j1 - j0):
                    g = widen(gr[j])
                    t1[j] += g
                    t2[j] += g * (widen(xr[j]) - tm[j])
        for c in range(C):
            a = 0.0
            b = 0.0
            for i in range(I):
                a += s1[c * I + i]
                b += s2[c * I + i]
            p1[k, c] = a
            p2[k, c] = b
    _sum_partials(p1, sum_dy)
    _sum_partials(p2, sum_dy_xmu)


# ------------------------------------------------------------ normalize / inference

@njit(parallel=True, **_OPTS)
def affine_rows(x, rows_per_task, center, scale, offset, y):
    """``y = (x - center[c]) * scale[c] + offset[c]`` on (R, C) views, in float64.

    Subtracting the centre first (rather than folding it into the offset) keeps a
    constant channel at exactly ``offset``: ``x - center`` is exactly zero there.
    On a folded view (see `fold_rows`) the per-channel vectors are tiled to its width.
    """
    W = x.shape[1]
    m, s, b = _tiled(center, W), _tiled(scale, W), _tiled(offset, W)
    for k in prange(row_tasks(x.shape[0], rows_per_task)):
        affine_rows_task(x, k, rows_per_task, m, s, b, y)


@njit(**_OPTS)
def affine_rows_task(x, k, rows_per_task, center, scale, offset, y):
    """Task ``k`` of `affine_rows`: its block of rows."""
    r0, r1 = task_rows(k, rows_per_task, x.shape[0])
    _affine_rows_block(x, r0, r1, center, scale, offset, y)


# The elementwise passes' task bodies are functions of their own, in two versions: the
# plain loop, and bfloat16's staged one; `_by_output_dtype` picks one while the kernel is
# typed, so neither is compiled for the other's element type. (With the staging as a
# branch, each dtype's kernels compiled both: the TensorFlow op's float32 entry points
# took 17-18 s to compile their serial set instead of 12; as a second ``prange`` loop,
# 31 s instead of 22 for the parallel set. Inside the loop, float32 ran 6-17% slower.)

def _by_output_dtype(plain, staged_version):
    """A function compiled as ``staged_version`` for bfloat16 outputs (the storage view
    ``int16``; the output is the last argument, or the first where the last is None: in
    place, see `_into`) and as ``plain`` for the others."""
    def select(*args):
        raise NotImplementedError("compiled code only")

    @overload(select)
    def _select(*args):
        out = args[0] if isinstance(args[-1], types.NoneType) else args[-1]
        chosen = staged_version if staged_dtype(out.dtype) else plain
        return lambda *args: chosen(*args)

    return select


# In place. An elementwise pass whose output is its first input (numbabn's TensorFlow op
# writes into a buffer it took over from its input; ``out=x`` in the NumPy API) gets
# None as its output, and writes through `_into` into that input: compiled with one
# array for both, LLVM sees one pointer and vectorizes the loop as it stands. Given the
# same buffer twice, its runtime overlap check failed and the scalar loop ran: 2-2.5x
# slower (float32 (8192, 256) inference, one thread: 1.3 against 2.3 elements/ns).

def _into(out, first):
    """The array an elementwise pass writes: ``out``, or its first input where ``out``
    is None (in place)."""
    raise NotImplementedError("compiled code only")


@overload(_into, inline="always")
def _into_impl(out, first):
    if isinstance(out, types.NoneType):
        return lambda out, first: first
    return lambda out, first: out


def _run_of(out, o, c, i0, i1):
    """``out[o, c, i0:i1]``, or None where ``out`` is None (in place)."""
    raise NotImplementedError("compiled code only")


@overload(_run_of, inline="always")
def _run_of_impl(out, o, c, i0, i1):
    if isinstance(out, types.NoneType):
        return lambda out, o, c, i0, i1: None
    return lambda out, o, c, i0, i1: out[o, c, i0:i1]


@njit(**_OPTS)
def _affine_rows_plain(x, r0, r1, center, scale, offset, y):
    out = _into(y, x)
    C = x.shape[1]
    for r in range(r0, r1):
        for c in range(C):
            out[r, c] = narrow(_affine_value(x[r, c], center[c], scale[c], offset[c]),
                               out.dtype)


@njit(**_OPTS)
def _affine_rows_staged(x, r0, r1, center, scale, offset, y):
    """bfloat16: a group of rows' values, then `narrow_block`."""
    C = x.shape[1]
    G = max(1, _BLOCK // C)
    t = np.empty(G * C)
    for g0 in range(r0, r1, G):
        g1 = min(r1, g0 + G)
        for r in range(g0, g1):
            xr = x[r]
            tr = t[(r - g0) * C:(r - g0 + 1) * C]
            for c in range(C):
                tr[c] = _affine_value(xr[c], center[c], scale[c], offset[c])
        _narrow_rows(t[:(g1 - g0) * C], _into(y, x), g0, g1)


_affine_rows_block = _by_output_dtype(_affine_rows_plain, _affine_rows_staged)


@njit(**_OPTS)
def _plane_segment(t, C, I, i_per):
    """Elementwise task t -> (o, c, i0, i1), numbered in memory order.

    Consecutive tasks are adjacent in memory, so each thread streams one contiguous
    part of the array: 12% faster than the reductions' channel-major order (measured
    on (64, 64, 56, 56) float32, 2 threads: 3.64 vs 4.09 ms, a copy 3.75 ms).
    """
    if i_per >= I:  # one segment per run, as for most maps: one division, not four
        o = t // C
        return o, t - o * C, 0, I
    n_i = (I + i_per - 1) // i_per
    oc = t // n_i
    i0 = (t % n_i) * i_per
    return oc // C, oc % C, i0, min(I, i0 + i_per)


def _narrow_rows(t, y, r0, r1):
    """Rows ``r0:r1`` of ``y`` (R, C) written from their staged values ``t`` (row-major):
    one `narrow_block` over the rows when ``y`` is C-contiguous (its rows one run), else
    one per row."""
    raise NotImplementedError("compiled code only")


@overload(_narrow_rows, inline="always")
def _narrow_rows_impl(t, y, r0, r1):
    if y.layout == "C":
        return lambda t, y, r0, r1: narrow_block(t, y[r0:r1].reshape(-1))

    def per_row(t, y, r0, r1):
        C = y.shape[1]
        for r in range(r0, r1):
            narrow_block(t[(r - r0) * C:(r - r0 + 1) * C], y[r])
    return per_row


@njit(**_OPTS)
def _affine_value(xv, m, s, b):
    """One output of the affine pass, in float64 (the same operations everywhere)."""
    return (widen(xv) - m) * s + b


#: elements a bfloat16 run is staged by (`_half.narrow_block`): 4 KiB of float64, in L1
#: (bfloat16 (x - m) * s + b in cache, one core: 128: 0.71, 256: 0.78, 512 and 1024: 0.81
#: elements/cycle)
_BLOCK = 512


@njit(**_OPTS)
def _affine_run_plain(xr, m, s, b, yr):
    out = _into(yr, xr)
    for i in range(xr.size):
        out[i] = narrow(_affine_value(xr[i], m, s, b), out.dtype)


@njit(**_OPTS)
def _affine_run_staged(xr, m, s, b, yr):
    t = np.empty(min(xr.size, _BLOCK))
    for i0 in range(0, xr.size, _BLOCK):
        n = min(xr.size - i0, _BLOCK)
        tb = t[:n]
        xb = xr[i0:i0 + n]
        for i in range(n):
            tb[i] = _affine_value(xb[i], m, s, b)
        narrow_block(tb, _into(yr, xr)[i0:i0 + n])


_affine_run = _by_output_dtype(_affine_run_plain, _affine_run_staged)


@njit(parallel=True, **_OPTS)
def affine_planes(x, i_per, center, scale, offset, y):
    """As ``affine_rows`` on (O, C, I) views.

    Runs shorter than ``config.SHORT_RUN`` (late conv layers: 4x4, 7x7 maps) go one
    outer index per task, all its channels, indexed in 3-D without slices: a task and
    two slice views per 16-element run cost more than its work (inference at
    (32, 256, 4, 4) float32: 193 us, 4.5x the NHWC time; now ~45 us, as NHWC). Elementwise,
    so the split changes no bit. (Through ``affine_rows`` on the (O, C * I) view with
    per-column vectors, as the short-run reductions, it ran slower: three more float64
    streams per element.)
    """
    O, C, I = x.shape
    for t in prange(elementwise_plane_tasks(O, C, I, i_per)):
        affine_planes_task(x, t, i_per, center, scale, offset, y)


@njit(**_OPTS)
def elementwise_plane_tasks(O, C, I, i_per):
    """Tasks of an elementwise planes pass: one outer index each for runs shorter than
    ``SHORT_RUN``, else one run segment each (`_plane_segment`)."""
    if I < SHORT_RUN:
        return O
    return O * C * ((I + i_per - 1) // i_per)


# The elementwise planes tasks are inlined into the loops that call them (Numba's IR
# inliner; the prange loops and the C entry points): a compiled call per task, its array
# arguments passed through Numba's calling convention, cost ~25-30 ns, and NCHW maps of
# 16x16 are 2048 tasks of 256 elements. Float32 (32, 64, 16, 16), in cache, one thread,
# both versions in one process in turns: inference 185 -> 117 us, train 294 -> 221,
# backward 373 -> 309 (with the one-division `_plane_segment`; a copy takes 45 us); the
# same bits. (Inlining the reductions' tasks too gained nothing measurable.)
@njit(inline="always", **_OPTS)
def affine_planes_task(x, t, i_per, center, scale, offset, y):
    """Task ``t`` of `affine_planes`."""
    O, C, I = x.shape
    if I < SHORT_RUN:
        out = _into(y, x)
        for c in range(C):
            m = center[c]
            s = scale[c]
            b = offset[c]
            for i in range(I):
                out[t, c, i] = narrow(_affine_value(x[t, c, i], m, s, b), out.dtype)
        return
    o, c, i0, i1 = _plane_segment(t, C, I, i_per)
    # 1-D slices vectorize; 3-D indexing in the loop did not
    _affine_run(x[o, c, i0:i1], center[c], scale[c], offset[c], _run_of(y, o, c, i0, i1))


# ------------------------------------------------------------------------- backward

@njit(parallel=True, **_OPTS)
def grad_sums_rows(dy, x, rows_per_task, mean, sum_dy, sum_dy_xmu):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` of (R, C) views, one pass;
    on a folded view (see `fold_rows`) per column, added per channel in the order of the
    columns, task after task (as `stats_rows`)."""
    R, W = x.shape
    C = mean.size
    ntasks = row_tasks(R, rows_per_task)
    p1 = np.empty((ntasks, W))
    p2 = np.empty((ntasks, W))
    m = _tiled(mean, W)
    for k in prange(ntasks):
        grad_sums_rows_task(dy, x, k, rows_per_task, m, p1, p2)
    parts = ntasks * (W // C)
    _sum_partials(p1.reshape(parts, C), sum_dy)
    _sum_partials(p2.reshape(parts, C), sum_dy_xmu)


@njit(**_OPTS)
def grad_sums_rows_task(dy, x, k, rows_per_task, mean, p1, p2):
    """Task ``k`` of `grad_sums_rows`: its rows' sums into ``p1[k]`` and ``p2[k]``."""
    R, C = x.shape
    r0, r1 = task_rows(k, rows_per_task, R)
    s1 = p1[k]
    s2 = p2[k]
    s1[:] = 0.0
    s2[:] = 0.0
    for r in range(r0, r1):
        for c in range(C):
            g = widen(dy[r, c])
            s1[c] += g
            s2[c] += g * (widen(x[r, c]) - mean[c])


@njit(parallel=True, **_OPTS)
def grad_sums_planes(dy, x, o_per, i_per, mean, sum_dy, sum_dy_xmu):
    """As ``grad_sums_rows`` on (O, C, I) views, with ``LANES`` accumulators (runs
    shorter than that: ``grad_sums_short_runs``, in ``backward_short``)."""
    O, C, I = x.shape
    n_j = plane_parts(O, I, o_per, i_per)
    p1 = np.empty((n_j, C))
    p2 = np.empty((n_j, C))
    for t in prange(C * n_j):
        grad_sums_planes_task(dy, x, t, o_per, i_per, mean, p1, p2)
    _sum_partials(p1, sum_dy)
    _sum_partials(p2, sum_dy_xmu)


@njit(**_OPTS)
def grad_sums_planes_task(dy, x, t, o_per, i_per, mean, p1, p2):
    """Task ``t`` of `grad_sums_planes`: one channel's sums over one block."""
    O, C, I = x.shape
    c, j, o0, o1, i0, i1 = _plane_task(t, C, O, I, o_per, i_per)
    m = mean[c]
    a1 = np.zeros(LANES)
    a2 = np.zeros(LANES)
    for o in range(o0, o1):
        xr = x[o, c, i0:i1]
        gr = dy[o, c, i0:i1]
        n_vec = (xr.size // LANES) * LANES
        for i in range(0, n_vec, LANES):
            xl = xr[i:i + LANES]
            gl = gr[i:i + LANES]
            for l in range(LANES):
                g = widen(gl[l])
                a1[l] += g
                a2[l] += g * (widen(xl[l]) - m)
        for l in range(xr.size - n_vec):
            g = widen(gr[n_vec + l])
            a1[l] += g
            a2[l] += g * (widen(xr[n_vec + l]) - m)
    s1 = 0.0
    s2 = 0.0
    for l in range(LANES):
        s1 += a1[l]
        s2 += a2[l]
    p1[j, c] = s1
    p2[j, c] = s2


@njit(parallel=True, **_OPTS)
def grad_input_rows(dy, x, rows_per_task, mean, k_dy, mean_dy, k_x, dx):
    """``dx = k_dy[c] * (dy - mean_dy[c]) - k_x[c] * (x - mean[c])`` on (R, C) views
    (folded: tiled vectors, as `affine_rows`)."""
    W = x.shape[1]
    m, a, md, b = _tiled(mean, W), _tiled(k_dy, W), _tiled(mean_dy, W), _tiled(k_x, W)
    for k in prange(row_tasks(x.shape[0], rows_per_task)):
        grad_input_rows_task(dy, x, k, rows_per_task, m, a, md, b, dx)


@njit(**_OPTS)
def grad_input_rows_task(dy, x, k, rows_per_task, mean, k_dy, mean_dy, k_x, dx):
    """Task ``k`` of `grad_input_rows`: its block of rows."""
    r0, r1 = task_rows(k, rows_per_task, x.shape[0])
    _grad_input_rows_block(dy, x, r0, r1, mean, k_dy, mean_dy, k_x, dx)


@njit(**_OPTS)
def _grad_input_rows_plain(dy, x, r0, r1, mean, k_dy, mean_dy, k_x, dx):
    out = _into(dx, dy)
    C = x.shape[1]
    for r in range(r0, r1):
        for c in range(C):
            out[r, c] = narrow(_grad_input_value(dy[r, c], x[r, c], mean[c], k_dy[c],
                                                 mean_dy[c], k_x[c]), out.dtype)


@njit(**_OPTS)
def _grad_input_rows_staged(dy, x, r0, r1, mean, k_dy, mean_dy, k_x, dx):
    """As `_affine_rows_staged`."""
    C = x.shape[1]
    G = max(1, _BLOCK // C)
    t = np.empty(G * C)
    for g0 in range(r0, r1, G):
        g1 = min(r1, g0 + G)
        for r in range(g0, g1):
            gr = dy[r]
            xr = x[r]
            tr = t[(r - g0) * C:(r - g0 + 1) * C]
            for c in range(C):
                tr[c] = _grad_input_value(gr[c], xr[c], mean[c], k_dy[c], mean_dy[c], k_x[c])
        _narrow_rows(t[:(g1 - g0) * C], _into(dx, dy), g0, g1)


_grad_input_rows_block = _by_output_dtype(_grad_input_rows_plain, _grad_input_rows_staged)


@njit(**_OPTS)
def _grad_input_value(g, xv, m, a, md, b):
    """One output of the dx pass, in float64 (the same operations everywhere)."""
    return a * (widen(g) - md) - b * (widen(xv) - m)


@njit(**_OPTS)
def _grad_input_run_plain(gr, xr, m, a, md, b, dr):
    out = _into(dr, gr)
    for i in range(xr.size):
        out[i] = narrow(_grad_input_value(gr[i], xr[i], m, a, md, b), out.dtype)


@njit(**_OPTS)
def _grad_input_run_staged(gr, xr, m, a, md, b, dr):
    t = np.empty(min(xr.size, _BLOCK))
    for i0 in range(0, xr.size, _BLOCK):
        n = min(xr.size - i0, _BLOCK)
        tb = t[:n]
        gb = gr[i0:i0 + n]
        xb = xr[i0:i0 + n]
        for i in range(n):
            tb[i] = _grad_input_value(gb[i], xb[i], m, a, md, b)
        narrow_block(tb, _into(dr, gr)[i0:i0 + n])


_grad_input_run = _by_output_dtype(_grad_input_run_plain, _grad_input_run_staged)


@njit(parallel=True, **_OPTS)
def grad_input_planes(dy, x, i_per, mean, k_dy, mean_dy, k_x, dx):
    """As ``grad_input_rows`` on (O, C, I) views, tasks in memory order (short runs:
    one outer index per task, as ``affine_planes``)."""
    O, C, I = x.shape
    for t in prange(elementwise_plane_tasks(O, C, I, i_per)):
        grad_input_planes_task(dy, x, t, i_per, mean, k_dy, mean_dy, k_x, dx)


@njit(inline="always", **_OPTS)  # inlined: see affine_planes_task
def grad_input_planes_task(dy, x, t, i_per, mean, k_dy, mean_dy, k_x, dx):
    """Task ``t`` of `grad_input_planes`, numbered as `affine_planes_task`'s."""
    O, C, I = x.shape
    if I < SHORT_RUN:
        out = _into(dx, dy)
        for c in range(C):
            m = mean[c]
            a = k_dy[c]
            md = mean_dy[c]
            b = k_x[c]
            for i in range(I):
                out[t, c, i] = narrow(_grad_input_value(dy[t, c, i], x[t, c, i], m, a, md, b),
                                      out.dtype)
        return
    o, c, i0, i1 = _plane_segment(t, C, I, i_per)
    _grad_input_run(dy[o, c, i0:i1], x[o, c, i0:i1], mean[c], k_dy[c], mean_dy[c], k_x[c],
                    _run_of(dx, o, c, i0, i1))


@njit(**_OPTS)
def any_negative(v):
    """Whether any element of ``v`` is < 0 (NaN is not)."""
    for a in v:
        if a < 0:
            return True
    return False


# ================================================================ whole operations
# One compiled call per operation: task plan, both passes and the per-channel maths, on
# a rows (R, C) or planes (O, C, I) view. The NumPy API calls them (one crossing from
# Python into Numba per call); numbabn's TensorFlow op runs the same passes' tasks and
# per-channel maths through the C entry points below. The per-channel maths are the formulas of ``_cpu.norm_coeffs`` /
# ``_cpu.grad_coeffs`` (used by ``stages`` and the CUDA backend's host side), written
# elementwise in the same IEEE operations: results are bitwise the same (tested).
#
# These are not ``parallel=True`` themselves; the kernels they call are. Numba links
# such a function against its threading layer's symbols when loading it from the cache,
# so the layer must be running first (``numba.get_num_threads()`` starts it;
# ``_runtime.run_kernel`` does), or LLVM aborts the process. (The C entry points call
# no parallel function, so they need no threading layer.)
# They live in this file so that editing a kernel invalidates their cached code too
# (Numba's cache tracks a function's own source file only).

def plan_sizes(outer, channels, inner):
    """Task sizes of a reduction from the shape alone (the key to determinism).

    Rows (``inner == 1``): ``(rows_per_task, 0)``. Planes: ``(o_per, i_per)``. The
    elementwise passes use ``rows_per_task`` (rows) or ``i_per`` (planes). Plain Python,
    also compiled below: one definition for ``_layout`` and the compiled operations.
    """
    if inner == 1:
        rows = max(-(-outer // MAX_CHUNKS), CHUNK_ELEMENTS // max(channels, 1), 1)
        return rows, 0
    if inner >= CHUNK_ELEMENTS:
        return 1, CHUNK_ELEMENTS
    o_per = max(CHUNK_ELEMENTS // inner, -(-outer // MAX_CHUNKS), 1)
    return o_per, inner


_plan = njit(**_OPS_OPTS)(plan_sizes)  # the compiled twin, for the operations below


def fold_rows(outer, channels):
    """Rows of a C-ordered rows view ``(outer, channels)`` that one folded row holds (1:
    not folded), from the shape alone (``config.FOLD_ROWS_BELOW``): the smallest divisor
    ``g`` of ``outer`` with ``g * channels >= FOLD_ROW_WIDTH``, up to 8 times that
    width. Plain Python, also compiled below, as `plan_sizes`."""
    if channels >= FOLD_ROWS_BELOW or channels < 1:
        return 1
    g0 = -(-FOLD_ROW_WIDTH // channels)
    for g in range(g0, min(outer, 8 * g0) + 1):
        if outer % g == 0:
            return g
    return 1


_fold = njit(**_OPS_OPTS)(fold_rows)


@njit(**_OPS_OPTS)
def _norm_coeffs(var, eps, gamma, invstd, scale):
    """``invstd = 1 / sqrt(var + eps)``, ``scale = invstd * gamma`` (NaN for var + eps < 0)."""
    for c in range(var.size):
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]


# -------------------------------------------------------------- rows (R, C) views

@njit(**_OPS_OPTS)
def train_rows(x, gamma, beta, eps, mean, var, invstd, y):
    """Batch statistics of ``x`` (R, C) into mean/var/invstd, and ``y`` normalized; ``x``
    and ``y`` may be folded views of C = ``mean.size`` channels (see `fold_rows`)."""
    rows, _ = _plan(x.shape[0], x.shape[1], 1)
    stats_rows(x, rows, mean, var)
    scale = np.empty(mean.size)
    _norm_coeffs(var, eps, gamma, invstd, scale)
    affine_rows(x, rows, mean, scale, beta, y)


@njit(**_OPS_OPTS)
def inference_rows(x, gamma, beta, moving_mean, moving_var, eps, y):
    """``y`` normalized with the moving statistics, (R, C) views (folded or not)."""
    rows, _ = _plan(x.shape[0], x.shape[1], 1)
    C = moving_mean.size
    invstd = np.empty(C)
    scale = np.empty(C)
    _norm_coeffs(moving_var, eps, gamma, invstd, scale)
    affine_rows(x, rows, moving_mean, scale, beta, y)


@njit(**_OPS_OPTS)
def backward_rows(dy, x, gamma, mean, invstd, dx, dgamma, dbeta):
    """Closed-form backward on (R, C) views (folded or not): ``dx``, ``dgamma`` and
    ``dbeta`` (= sum(dy))."""
    R, W = x.shape
    C = mean.size
    rows, _ = _plan(R, W, 1)
    sum_dy_xmu = np.empty(C)
    grad_sums_rows(dy, x, rows, mean, dbeta, sum_dy_xmu)
    k_dy, mean_dy, k_x = np.empty(C), np.empty(C), np.empty(C)
    _grad_coeffs(dbeta, sum_dy_xmu, invstd, gamma, R * (W // C), dgamma, k_dy, mean_dy, k_x)
    grad_input_rows(dy, x, rows, mean, k_dy, mean_dy, k_x, dx)


@njit(**_OPS_OPTS)
def _grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma, n, dgamma, k_dy, mean_dy, k_x):
    """As ``_cpu.grad_coeffs``, elementwise, into ``dgamma``, ``k_dy``, ``mean_dy``, ``k_x``."""
    for c in range(sum_dy.size):
        dgamma[c] = sum_dy_xmu[c] * invstd[c]
        k_dy[c] = invstd[c] * gamma[c]
        k_x[c] = k_dy[c] * invstd[c] * dgamma[c] / n
        mean_dy[c] = sum_dy[c] / n


# ------------------------------------------------------------ planes (O, C, I) views

@njit(**_OPS_OPTS)
def train_planes(x, gamma, beta, eps, mean, var, invstd, y):
    """As ``train_rows`` on (O, C, I) views."""
    O, C, I = x.shape
    o_per, i_per = _plan(O, C, I)
    stats_planes(x, o_per, i_per, mean, var)
    scale = np.empty(C)
    _norm_coeffs(var, eps, gamma, invstd, scale)
    affine_planes(x, i_per, mean, scale, beta, y)


@njit(**_OPS_OPTS)
def inference_planes(x, gamma, beta, moving_mean, moving_var, eps, y):
    """As ``inference_rows`` on (O, C, I) views."""
    O, C, I = x.shape
    _, i_per = _plan(O, C, I)
    invstd = np.empty(C)
    scale = np.empty(C)
    _norm_coeffs(moving_var, eps, gamma, invstd, scale)
    affine_planes(x, i_per, moving_mean, scale, beta, y)


@njit(**_OPS_OPTS)
def backward_planes(dy, x, gamma, mean, invstd, dx, dgamma, dbeta):
    """As ``backward_rows`` on (O, C, I) views."""
    O, C, I = x.shape
    o_per, i_per = _plan(O, C, I)
    sum_dy_xmu = np.empty(C)
    grad_sums_planes(dy, x, o_per, i_per, mean, dbeta, sum_dy_xmu)
    k_dy, mean_dy, k_x = np.empty(C), np.empty(C), np.empty(C)
    _grad_coeffs(dbeta, sum_dy_xmu, invstd, gamma, O * I, dgamma, k_dy, mean_dy, k_x)
    grad_input_planes(dy, x, i_per, mean, k_dy, mean_dy, k_x, dx)


# ------------------------------------------------- planes with runs shorter than LANES

def short_runs(x, I):
    """Whether the (O, C, I) view ``x`` takes the ``*_short`` operations: runs shorter
    than ``LANES`` (4x4, 2x2 maps in NCHW), each outer index's channels one strided run
    (so `_columns` can view it as (O, C * I))."""
    return I < LANES and x.strides[1] == I * x.strides[2]


@njit(**_OPS_OPTS)
def train_short(x, gamma, beta, eps, mean, var, invstd, y):
    """``train_planes`` with the statistics of ``stats_short_runs``."""
    O, C, I = x.shape
    _, i_per = _plan(O, C, I)
    stats_short_runs(_columns(x), I, _plan(O, C * I, 1)[0], mean, var)
    scale = np.empty(C)
    _norm_coeffs(var, eps, gamma, invstd, scale)
    affine_planes(x, i_per, mean, scale, beta, y)


@njit(**_OPS_OPTS)
def backward_short(dy, x, gamma, mean, invstd, dx, dgamma, dbeta):
    """``backward_planes`` with the sums of ``grad_sums_short_runs``."""
    O, C, I = x.shape
    _, i_per = _plan(O, C, I)
    sum_dy_xmu = np.empty(C)
    grad_sums_short_runs(_columns(dy), _columns(x), I, _plan(O, C * I, 1)[0], mean, dbeta,
                         sum_dy_xmu)
    k_dy, mean_dy, k_x = np.empty(C), np.empty(C), np.empty(C)
    _grad_coeffs(dbeta, sum_dy_xmu, invstd, gamma, O * I, dgamma, k_dy, mean_dy, k_x)
    grad_input_planes(dy, x, i_per, mean, k_dy, mean_dy, k_x, dx)


# ================================================================== serial twins
# Small inputs run on the calling thread (``config.SERIAL_BELOW``). A ``parallel=True``
# function run with one thread still enters Numba's parallel runtime (a scheduler call
# per ``prange`` loop, two thread-count switches around the call: ~4 us of a 12 us
# (64, 256) training forward here), and under the workqueue layer it must hold the lock.
# Each function that is or calls a parallel kernel therefore has a serial twin: the same
# code object compiled without ``parallel`` (``prange`` is then ``range``), whose
# callees are the twins. Same code, same order of every sum: the same bits.


def _twin_function(py, namespace):
    """``py``'s code with its globals looked up in ``namespace``, under a qualname of its
    own (Numba names its cache files by qualname)."""
    twin = types_module.FunctionType(py.__code__, namespace, py.__name__, py.__defaults__)
    twin.__qualname__ = "serial_" + py.__qualname__
    return twin


def _serial_twins(namespace):
    """Replace, in ``namespace``, each parallel function and operation by its twin."""
    parallel = [name for name, f in namespace.items()
                if isinstance(f, numba.core.registry.CPUDispatcher)
                and f.targetoptions.get("parallel")]
    twins = {}
    for name in parallel + list(OPERATIONS):
        f = namespace[name]
        options = {k: v for k, v in f.targetoptions.items()
                   if k not in ("parallel", "nopython")}
        # callees are looked up when a twin compiles: by then they are twins too
        twins[f] = namespace[name] = njit(cache=True, **options)(
            _twin_function(f.py_func, namespace))
    return twins


#: the compiled operations that call parallel kernels, by name
OPERATIONS = ("train_rows", "train_planes", "inference_rows", "inference_planes",
              "backward_rows", "backward_planes", "train_short", "backward_short")
_SERIAL_NAMESPACE = dict(globals())
#: ``{parallel function: its serial twin}``, for every parallel kernel and operation
SERIAL = _serial_twins(_SERIAL_NAMESPACE)


# ==================================================================== C entry points
# For callers without Python: numbabn's TensorFlow op (``keras_layer._native``) and its
# PyTorch op (``numbabn.torch._native``) call these ``@cfunc`` functions with raw pointers
# into buffers the framework allocated, and run them on the framework's own thread pool. They are the whole operations above taken apart:
# each pass is split into the tasks of its ``prange`` loop (the task functions above,
# the same split, from the shape alone), the caller runs tasks [t0, t1) per call on as
# many threads as it likes (a task writes its own partial result or its own elements),
# then merges the partial results in one call, in task order. So the results are the
# NumPy API's bits, whatever the threads; and no entry point uses Numba's thread pool
# (in a TensorFlow process a second pool fought TensorFlow's for the same cores: inside
# a model step the op's kernels took 2-4x their time alone).
#
# Every buffer is a dense C-ordered array viewed as (outer, C, inner) around the channel
# axis (rows (outer, C) when inner == 1); per-channel vectors and partial results are
# float64; the caller guarantees C > 0 and outer * inner > 0. ``T`` is float32 or
# float64, or the bits of a half format (``_half``'s views: uint16 for float16, int16 for
# bfloat16). ``y`` may be ``x`` and ``dx`` may be ``dy`` (in place: an elementwise task
# reads each element before it writes it; see `_into`).
#
#   plan(outer, C, inner, sizes: i64[3])  sizes = (reduction tasks, partial results,
#       elementwise tasks); a partial result is one float64 per channel (plus a count)
#   stats(x: T*, outer, C, inner, t0, t1, counts: f64[parts], pmean, pm2: f64[parts*C])
#   train_coeffs(counts, pmean, pm2, parts, C, gamma, eps, mean, var, invstd, scale)
#   norm_coeffs(var, C, eps, gamma, invstd, scale)
#   affine(x: T*, y: T*, outer, C, inner, t0, t1, center, scale, offset)
#   grad_sums(dy: T*, x: T*, outer, C, inner, t0, t1, mean, p1, p2: f64[parts*C])
#   grad_coeffs(p1, p2, parts, C, n, invstd, gamma, dgamma, dbeta, k_dy, mean_dy, k_x)
#   grad_input(dy: T*, x: T*, dx: T*, outer, C, inner, t0, t1, mean, k_dy, mean_dy, k_x)
#
# training: plan, stats over all reduction tasks, train_coeffs, affine (center = mean)
# over all elementwise tasks; inference: norm_coeffs, affine (center = moving mean);
# backward: grad_sums, grad_coeffs (n = outer * inner), grad_input.
#
# Runs shorter than LANES (1 < inner < LANES, `short_runs`; the NumPy API's
# ``train_short`` / ``backward_short``) take their reductions whole, on the calling thread:
#   stats_short(x: T*, outer, C, inner, mean, var)  then norm_coeffs
#   grad_sums_short(dy: T*, x: T*, outer, C, inner, mean, sum_dy, sum_dy_xmu)  then
#       grad_coeffs with parts = 1 (p1 = sum_dy, p2 = sum_dy_xmu)


@njit(**_OPTS)
def _same_buffer(p, q):
    """Whether the pointers ``p`` and ``q`` are equal (in place: see `_into`)."""
    return carray(p, 1).ctypes.data == carray(q, 1).ctypes.data


@njit(**_OPTS)
def _rows_view(outer, C):
    """The rows view of a dense (outer, C) buffer as the NumPy API takes it (folded, see
    `fold_rows`): ``(rows, width, rows_per_task, fold)``."""
    g = _fold(outer, C)
    rows, _ = _plan(outer // g, g * C, 1)
    return outer // g, g * C, rows, g


def _entry_plan(outer, C, inner, sizes):
    s = carray(sizes, 3)
    if inner == 1:
        R, _, a, g = _rows_view(outer, C)
        s[0] = s[2] = row_tasks(R, a)
        s[1] = s[0] * g  # a folded view's tasks give g partial results each
    else:
        a, b = _plan(outer, C, inner)
        parts = plane_parts(outer, inner, a, b)
        s[0] = C * parts
        s[1] = parts
        s[2] = elementwise_plane_tasks(outer, C, inner, b)


def _entry_stats(x, outer, C, inner, t0, t1, counts, pmean, pm2):
    if inner == 1:
        R, W, a, g = _rows_view(outer, C)
        tasks = row_tasks(R, a)
        xv = carray(x, (R, W))
        n, m, m2 = carray(counts, tasks * g), carray(pmean, (tasks, W)), carray(pm2, (tasks, W))
        for k in range(t0, t1):
            stats_rows_task(xv, k, a, n, m, m2)
    else:
        a, b = _plan(outer, C, inner)
        parts = plane_parts(outer, inner, a, b)
        xv = carray(x, (outer, C, inner))
        n, m, m2 = carray(counts, parts), carray(pmean, (parts, C)), carray(pm2, (parts, C))
        for t in range(t0, t1):
            stats_planes_task(xv, t, a, b, n, m, m2)


def _entry_train_coeffs(counts, pmean, pm2, parts, C, gamma, eps, mean, var, invstd, scale):
    v = carray(var, C)
    _merge_moments(carray(counts, parts), carray(pmean, (parts, C)), carray(pm2, (parts, C)),
                   carray(mean, C), v)
    _norm_coeffs(v, eps, carray(gamma, C), carray(invstd, C), carray(scale, C))


def _entry_norm_coeffs(var, C, eps, gamma, invstd, scale):
    _norm_coeffs(carray(var, C), eps, carray(gamma, C), carray(invstd, C), carray(scale, C))


def _entry_affine(x, y, outer, C, inner, t0, t1, center, scale, offset):
    m, s, o = carray(center, C), carray(scale, C), carray(offset, C)
    in_place = _same_buffer(x, y)
    if inner == 1:
        R, W, a, _ = _rows_view(outer, C)
        m, s, o = _tiled(m, W), _tiled(s, W), _tiled(o, W)
        xv, yv = carray(x, (R, W)), carray(y, (R, W))
        for k in range(t0, t1):
            if in_place:
                affine_rows_task(xv, k, a, m, s, o, None)
            else:
                affine_rows_task(xv, k, a, m, s, o, yv)
    else:
        _, b = _plan(outer, C, inner)
        xv, yv = carray(x, (outer, C, inner)), carray(y, (outer, C, inner))
        for t in range(t0, t1):
            if in_place:
                affine_planes_task(xv, t, b, m, s, o, None)
            else:
                affine_planes_task(xv, t, b, m, s, o, yv)


def _entry_grad_sums(dy, x, outer, C, inner, t0, t1, mean, p1, p2):
    m = carray(mean, C)
    if inner == 1:
        R, W, a, _ = _rows_view(outer, C)
        tasks = row_tasks(R, a)
        gv, xv = carray(dy, (R, W)), carray(x, (R, W))
        s1, s2 = carray(p1, (tasks, W)), carray(p2, (tasks, W))
        m = _tiled(m, W)
        for k in range(t0, t1):
            grad_sums_rows_task(gv, xv, k, a, m, s1, s2)
    else:
        a, b = _plan(outer, C, inner)
        parts = plane_parts(outer, inner, a, b)
        gv, xv = carray(dy, (outer, C, inner)), carray(x, (outer, C, inner))
        s1, s2 = carray(p1, (parts, C)), carray(p2, (parts, C))
        for t in range(t0, t1):
            grad_sums_planes_task(gv, xv, t, a, b, m, s1, s2)


def _entry_grad_coeffs(p1, p2, parts, C, n, invstd, gamma, dgamma, dbeta, k_dy, mean_dy,
                       k_x):
    sum_dy, sum_dy_xmu = carray(dbeta, C), np.empty(C)
    _sum_partials(carray(p1, (parts, C)), sum_dy)
    _sum_partials(carray(p2, (parts, C)), sum_dy_xmu)
    _grad_coeffs(sum_dy, sum_dy_xmu, carray(invstd, C), carray(gamma, C), n,
                 carray(dgamma, C), carray(k_dy, C), carray(mean_dy, C), carray(k_x, C))


def _entry_grad_input(dy, x, dx, outer, C, inner, t0, t1, mean, k_dy, mean_dy, k_x):
    m, kd, md, kx = carray(mean, C), carray(k_dy, C), carray(mean_dy, C), carray(k_x, C)
    in_place = _same_buffer(dy, dx)
    if inner == 1:
        R, W, a, _ = _rows_view(outer, C)
        m, kd, md, kx = _tiled(m, W), _tiled(kd, W), _tiled(md, W), _tiled(kx, W)
        gv, xv, dv = carray(dy, (R, W)), carray(x, (R, W)), carray(dx, (R, W))
        for k in range(t0, t1):
            if in_place:
                grad_input_rows_task(gv, xv, k, a, m, kd, md, kx, None)
            else:
                grad_input_rows_task(gv, xv, k, a, m, kd, md, kx, dv)
    else:
        _, b = _plan(outer, C, inner)
        shape = (outer, C, inner)
        gv, xv, dv = carray(dy, shape), carray(x, shape), carray(dx, shape)
        for t in range(t0, t1):
            if in_place:
                grad_input_planes_task(gv, xv, t, b, m, kd, md, kx, None)
            else:
                grad_input_planes_task(gv, xv, t, b, m, kd, md, kx, dv)


def _entry_stats_short(x, outer, C, inner, mean, var):
    # runs shorter than LANES (`short_runs`): the statistics of ``train_short``, whole, on
    # the calling thread (as there); the result is merged, not partial
    stats_short_runs(carray(x, (outer, C * inner)), inner, _plan(outer, C * inner, 1)[0],
                     carray(mean, C), carray(var, C))


def _entry_grad_sums_short(dy, x, outer, C, inner, mean, sum_dy, sum_dy_xmu):
    # the sums of ``backward_short``, whole: one partial result (``parts`` = 1 for
    # ``grad_coeffs``, whose sum over one part gives these bits back)
    shape = (outer, C * inner)
    grad_sums_short_runs(carray(dy, shape), carray(x, shape), inner,
                         _plan(outer, C * inner, 1)[0], carray(mean, C), carray(sum_dy, C),
                         carray(sum_dy_xmu, C))


_i64 = types.int64
_f64 = types.CPointer(types.float64)
#: the entry points that do not depend on the element type: (body, signature)
_COMMON_ENTRIES = {
    "plan": (_entry_plan, types.void(_i64, _i64, _i64, types.CPointer(_i64))),
    "train_coeffs": (_entry_train_coeffs, types.void(_f64, _f64, _f64, _i64, _i64, _f64,
                                                     types.float64, _f64, _f64, _f64, _f64)),
    "norm_coeffs": (_entry_norm_coeffs, types.void(_f64, _i64, types.float64, _f64, _f64,
                                                   _f64)),
    "grad_coeffs": (_entry_grad_coeffs, types.void(_f64, _f64, _i64, _i64, _i64,
                                                   *[_f64] * 7)),
}


def _element_entries(t):
    """The entry points on elements of type ``t``: ``{name: (body, signature)}``."""
    p = types.CPointer(t)
    return {
        "stats": (_entry_stats, types.void(p, *[_i64] * 5, _f64, _f64, _f64)),
        "affine": (_entry_affine, types.void(p, p, *[_i64] * 5, _f64, _f64, _f64)),
        "grad_sums": (_entry_grad_sums, types.void(p, p, *[_i64] * 5, _f64, _f64, _f64)),
        "grad_input": (_entry_grad_input, types.void(p, p, p, *[_i64] * 5, *[_f64] * 4)),
    }


def _short_entries(t):
    """The short-run entry points (channels-first maps smaller than 8x8)."""
    p = types.CPointer(t)
    return {
        "stats_short": (_entry_stats_short, types.void(p, *[_i64] * 3, _f64, _f64)),
        "grad_sums_short": (_entry_grad_sums_short, types.void(p, p, *[_i64] * 3, *[_f64] * 3)),
    }


_entry_points = {}
_entry_lock = threading.Lock()  # a set compiles whole before anyone reads it


def c_entry_points(dtype, short_runs=False):
    """``{name: address}`` of the C entry points above for elements of ``dtype``
    ("float32", "float64", or "uint16"/"int16" for float16/bfloat16 bits), with the
    element-free ones (``plan``, ``train_coeffs``, ``norm_coeffs``, ``grad_coeffs``),
    and with ``short_runs`` the short-run ones (``stats_short``, ``grad_sums_short``),
    compiled (or loaded from Numba's cache) on first use; the functions stay alive as long
    as the process. A dtype's set takes ~10 s to compile with a cold cache."""
    dtype = str(dtype)
    t = getattr(types, dtype)
    sets = [("common", _COMMON_ENTRIES), (dtype, _element_entries(t))]
    if short_runs:
        sets.append(("short " + dtype, _short_entries(t)))
    # cfunc compiles and saves to the cache as it is created: under the cache's lock
    # (see numbabn._cache); a process that waited for it then loads what was saved
    with _entry_lock, _cache.locked(_cache.cache_path(row_tasks)):
        for key, entries in sets:
            if key not in _entry_points:
                _entry_points[key] = {
                    name: cfunc(signature, cache=True, error_model="numpy")(body)
                    for name, (body, signature) in entries.items()}
        return {name: f.address for key, _ in sets for name, f in _entry_points[key].items()}


# every cached function above saves to Numba's cache under a lock (see numbabn._cache)
_cache.lock_saves([*globals().values(), *_SERIAL_NAMESPACE.values()])
