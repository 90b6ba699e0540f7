"""Map an N-d array and its channel axis onto the two kernel layouts, without copies.

Statistics are taken over every axis but the channel axis, so the order in which the
other axes are walked does not matter. ``Layout`` therefore walks the array in its own
memory order: axes sorted by decreasing stride, then merged into ``outer`` (before the
channel axis in that order) and ``inner`` (after it). A C-ordered NHWC array becomes
rows ``(N*H*W, C)``, NCHW becomes planes ``(N, C, H*W)``, and a Fortran-ordered (N, C)
array becomes planes ``(1, C, N)``: all views. Every array of one call (x, dy, out) is
viewed through the same ``Layout`` so that the same index means the same element.

Only arrays whose axes cannot be merged into one strided axis (for example
``x[:, :, ::2]``) are copied, once, to a contiguous array.

The CPU kernels see narrow rows folded (`prepare`): a C-ordered (R, C) view with fewer
than ``config.FOLD_ROWS_BELOW`` channels becomes (R / g, g * C), g rows side by side
(``Layout.fold``, from ``_kernels_cpu.fold_rows``), still a view; every array of the
call is viewed so (one that cannot be, an ``out=`` of other strides, is written
through a temporary; a ``dy``, copied).
"""

import math
from typing import NamedTuple

import numpy as np

from . import _pool
from ._kernels_cpu import fold_rows, plan_sizes
from .config import FOLD_ROWS_BELOW


class Layout(NamedTuple):
    perm: tuple      # axis order of the walk (decreasing strides of the reference array)
    outer: int
    channels: int
    inner: int
    fold: int = 1    # rows side by side in one row of the CPU kernels' view (`prepare`)

    @property
    def is_rows(self):
        return self.inner == 1

    @property
    def count(self):
        """Elements per channel."""
        return self.outer * self.inner

    def plan(self):
        """Task sizes, from the shape alone (see ``config``): the key to determinism."""
        sizes = plan_sizes(self.outer // self.fold, self.channels * self.fold, self.inner)
        return sizes[:1] if self.is_rows else sizes

    def elementwise_plan(self):
        """Task sizes of the elementwise kernels: row blocks, or plane segments (i_per)."""
        return self.plan() if self.is_rows else self.plan()[-1:]


#: Layouts already planned, by (shape, strides, axis): planning costs a few microseconds,
#: a third of a whole small call, and a training loop sees the same few shapes each step.
_PLANNED = {}
_MAX_PLANNED = 4096
#: ``tuple(range(ndim))``, the walk of a C-ordered array, by ndim
_IN_ORDER = [tuple(range(n)) for n in range(65)]  # NumPy allows 64 dimensions


def layout_of(x, axis):
    """The walk of ``x`` (channel axis ``axis``, already normalized) in memory order."""
    key = (x.shape, x.strides, axis)
    layout = _PLANNED.get(key)
    if layout is None:
        layout = _plan_layout(x, axis)
        if len(_PLANNED) >= _MAX_PLANNED:  # bounded: a program of ever-new shapes
            _PLANNED.clear()
        _PLANNED[key] = layout
    return layout


def _plan_layout(x, axis):
    if x.flags.c_contiguous:  # the common case, without the sort
        perm = tuple(range(x.ndim))
    else:
        perm = tuple(sorted(range(x.ndim), key=lambda a: -abs(x.strides[a])))
    p = perm.index(axis)
    shape = [x.shape[a] for a in perm]
    return Layout(perm, math.prod(shape[:p]), x.shape[axis], math.prod(shape[p + 1:]))


def blocks(a, layout):
    """A view of ``a`` in ``layout``: 2-D rows or 3-D planes; ``None`` if that needs a copy."""
    if a.flags.c_contiguous and layout.perm == _IN_ORDER[a.ndim]:  # always a view
        if layout.inner == 1:
            return a.reshape(layout.outer // layout.fold, layout.channels * layout.fold)
        return a.reshape(layout.outer, layout.channels, layout.inner)
    try:
        v = np.reshape(a.transpose(layout.perm), (layout.outer, layout.channels,
                                                  layout.inner), copy=False)
    except ValueError:
        return None
    if not layout.is_rows:
        return v
    v = v[:, :, 0]
    if layout.fold == 1:
        return v
    if not v.flags.c_contiguous:
        return None
    return v.reshape(layout.outer // layout.fold, layout.channels * layout.fold)


def input_blocks(a, layout):
    """``blocks`` of an input, copying it into the layout's order if it must."""
    v = blocks(a, layout)
    if v is None:
        v = blocks(np.ascontiguousarray(a.transpose(layout.perm)).transpose(
            np.argsort(layout.perm)), layout)
    return v


def empty_like_layout(shape, dtype, layout):
    """A new array of logical ``shape`` whose memory follows ``layout`` (so ``blocks`` is a
    view); large ones from the output pool (``_pool``: no fresh pages per call)."""
    if layout.perm == _IN_ORDER[len(shape)]:
        return _pool.empty(shape, dtype)
    walk = _pool.empty([shape[a] for a in layout.perm], dtype)
    return walk.transpose(np.argsort(layout.perm))


#: folded rows layouts (`prepare`), by the layout they fold
_FOLDED = {}


def prepare(x, axis):
    """Layout of ``x`` and its blocks view, for the CPU kernels (narrow rows folded when
    ``x``'s rows are one run); copies only unmergeable strided inputs."""
    layout = layout_of(x, axis)
    v = blocks(x, layout)
    if v is None:
        x = np.ascontiguousarray(x)
        layout = layout_of(x, axis)
        v = blocks(x, layout)
    if layout.inner == 1 and layout.channels < FOLD_ROWS_BELOW and v.flags.c_contiguous:
        folded = _FOLDED.get(layout)
        if folded is None:
            folded = layout._replace(fold=fold_rows(layout.outer, layout.channels))
            if len(_FOLDED) >= _MAX_PLANNED:
                _FOLDED.clear()
            _FOLDED[layout] = folded
        if folded.fold > 1:
            return folded, v.reshape(folded.outer // folded.fold,
                                     folded.channels * folded.fold)
    return layout, v
