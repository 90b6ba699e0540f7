"""Reused memory for large outputs: no fresh pages on every allocating call.

A new 51 MB ``np.empty`` is fresh memory from the OS (glibc maps blocks this large on
their own and unmaps them when freed), so its first write page-faults and the kernel
zero-fills every page: the allocating calls of the NumPy API at (64, 56, 56, 64) float32
took ~1.7x their ``out=`` time here. Users call with fresh outputs every time, so large
outputs (`MIN_BYTES` and up) come from this pool instead, as numbabn's TensorFlow op
does for its outputs.

How it knows a buffer is free again: every output is a view of an *owner* array that the
pool keeps, and NumPy collapses chains of views onto the array that owns the memory, so
every live view of an output (slices, transposes, ``torch.from_numpy``, a DLPack or
buffer export, ``as_strided``) holds a reference to the owner, directly or through the
object it wraps. An owner whose reference count is back to the pool's own references is
read by nobody, and only then is it handed out again: a buffer is never reused while
anything can still read it. The check is a reference count under a lock, so concurrent
callers (framework thread pools) never get the same buffer.

Reuse is by exact size (models repeat their shapes). The pool keeps at most
`CAP_BYTES` of owners (``NUMBABN_POOL_MB``, default 1024, the variable that bounds the
TensorFlow op's pool too): beyond that the oldest are forgotten (still-used ones stay alive
until their last view goes, as any array). Process-wide allocator settings are left
alone. Outputs over half the cap are not pooled (one would hold the pool past it after
its caller is done). Outputs are 64-byte aligned (what TensorFlow wants to adopt a buffer).
"""

import os
import sys
import threading

import numpy as np

#: outputs of at least this many bytes come from the pool; below it malloc's own free
#: lists reuse memory (no fresh pages) and ``np.empty`` is cheaper than a pool lookup
MIN_BYTES = 1 << 20
#: bytes of owner arrays the pool keeps at most (``NUMBABN_POOL_MB``, default 1024 MB)
CAP_BYTES = int(os.environ.get("NUMBABN_POOL_MB", "1024")) << 20
ALIGN = 64

_lock = threading.Lock()
_owners = {}  # nbytes -> [[owner, offset of the aligned start], ...], oldest first
_held = [0]  # bytes of all owners in _owners


def _references(entry):
    return sys.getrefcount(entry[0])


def _baseline():
    """An owner's reference count, seen by `_references`, when only the pool holds it
    (measured rather than assumed: interpreters count stack references differently)."""
    entries = [[np.empty(1, np.uint8), 0]]
    for entry in entries:
        return _references(entry)


_UNREFERENCED = _baseline()


def _aligned(owner, start, nbytes):
    return owner[start:start + nbytes]


def empty_bytes(nbytes):
    """A new 64-byte-aligned uint8 array of ``nbytes``, from the pool when large."""
    if nbytes < MIN_BYTES or nbytes > CAP_BYTES // 2:
        # small: malloc reuses; huge: kept in the pool it would hold more than its cap
        owner = np.empty(nbytes + ALIGN, np.uint8)
        return _aligned(owner, -owner.ctypes.data % ALIGN, nbytes)
    with _lock:
        entries = _owners.setdefault(nbytes, [])
        for entry in entries:
            if _references(entry) == _UNREFERENCED:
                return _aligned(entry[0], entry[1], nbytes)
        owner = np.empty(nbytes + ALIGN, np.uint8)
        entry = [owner, -owner.ctypes.data % ALIGN]
        entries.append(entry)
        _held[0] += owner.nbytes
        _trim(entry)
        return _aligned(owner, entry[1], nbytes)


def empty(shape, dtype):
    """``np.empty(shape, dtype)`` (C order), from the pool when large."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if nbytes < MIN_BYTES or nbytes > CAP_BYTES // 2:
        return np.empty(shape, dtype)
    return empty_bytes(nbytes).view(dtype).reshape(shape)


def _trim(keep):
    """Forget the oldest owners until the pool holds at most `CAP_BYTES`: free ones
    first, then used ones (their views keep them alive; they are freed with the last),
    never ``keep``, the entry being handed out."""
    for only_free in (True, False):
        for nbytes in list(_owners):
            entries = _owners[nbytes]
            for entry in list(entries):
                if _held[0] <= CAP_BYTES:
                    return
                if entry is keep or (only_free and _references(entry) != _UNREFERENCED):
                    continue
                # by identity: list.remove would compare owners with ==, elementwise
                del entries[next(i for i, e in enumerate(entries) if e is entry)]
                _held[0] -= entry[0].nbytes
            if not entries:
                del _owners[nbytes]


def held_bytes():
    """Bytes of owner arrays the pool keeps (for tests and reports)."""
    return _held[0]
