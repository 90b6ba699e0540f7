"""float16 <-> float32 conversions for the CPU kernels: parallel and memory-bound.

Numba has no float16 type on the CPU, so float16 inputs are computed in float32. NumPy's
own casts run on one thread at 0.15-0.4 G elements/s (30-90 ms each way for a 51 MB
float32 tensor here, 5-10x the batch-norm kernels themselves), so the conversions here
work on the uint16 bit patterns, split into parallel tasks, in one of two ways:

* ``HARDWARE``: LLVM's ``fpext``/``fptrunc`` between ``half`` and ``float``, which it
  compiles to the CPU's conversion instructions (x86 F16C ``vcvtph2ps``/``vcvtps2ph``,
  vectorized; AArch64 ``fcvt``): ~4 ms each way for 12.8 M elements on 2 cores here;
* otherwise, portable code: widening looks the value up in a 65536-entry float32 table
  that NumPy built, narrowing is NumPy's round-to-nearest-even bit algorithm
  (``npy_floatbits_to_halfbits`` in numpy's halffloat.c): 9 and 16 ms here.

Both give NumPy's results bit for bit (IEEE round to nearest even; overflow to
infinity, gradual underflow to subnormals and signed zeros; NaNs stay NaNs, though the
hardware may set a signalling NaN's quiet bit). Both are elementwise, so the thread
count cannot change a result. Layouts other than C- or Fortran-contiguous (and a
float16 ``out`` laid out unlike the result) fall back to NumPy's casts.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._runtime import run_kernel


def _hardware_half():
    """Whether LLVM lowers half <-> float conversions to instructions on this CPU
    (without them it would emit calls to compiler-rt helpers Numba does not link)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c", False))
    except Exception:  # noqa: BLE001 - no feature list: take the portable path
        return False


HARDWARE = _hardware_half()

#: float16 bit pattern -> its float32 value
_WIDEN = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)

#: elements per parallel task: long enough to amortize scheduling, many per thread
_TASK = 1 << 16


@intrinsic
def _half_to_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(parallel=True, cache=True)
def _widen_hw(bits, out):
    n = bits.size
    for t in prange((n + _TASK - 1) // _TASK):
        for i in range(t * _TASK, min(n, (t + 1) * _TASK)):
            out[i] = _half_to_float(bits[i])


@njit(parallel=True, cache=True)
def _narrow_hw(values, out):
    n = values.size
    for t in prange((n + _TASK - 1) // _TASK):
        for i in range(t * _TASK, min(n, (t + 1) * _TASK)):
            out[i] = _float_to_half(values[i])


@njit(parallel=True, cache=True)
def _widen(bits, table, out):
    n = bits.size
    for t in prange((n + _TASK - 1) // _TASK):
        for i in range(t * _TASK, min(n, (t + 1) * _TASK)):
            out[i] = table[bits[i]]


@njit(cache=True, inline="always")
def _half_bits(f):
    """float32 bits ``f`` (as int64) -> float16 bits, rounded to nearest even."""
    sign = (f & 0x80000000) >> 16
    exp = f & 0x7F800000
    sig = f & 0x007FFFFF
    if exp >= 0x47800000:  # beyond float16's range: infinity, or inf/NaN already
        if exp == 0x7F800000 and sig != 0:
            h = 0x7C00 + (sig >> 13)
            return sign + (h + 1 if h == 0x7C00 else h)  # keep it a NaN
        return sign + 0x7C00
    if exp <= 0x38000000:  # a float16 subnormal or zero
        if exp < 0x33000000:
            return sign
        sig = (sig + 0x00800000) >> (113 - (exp >> 23))
        # ties to even: the shift above may drop up to 11 bits, checked in f itself
        if (sig & 0x3FFF) != 0x1000 or (f & 0x7FF) != 0:
            sig += 0x1000
        return sign + (sig >> 13)
    h_exp = (exp - 0x38000000) >> 13
    if (sig & 0x3FFF) != 0x1000:
        sig += 0x1000
    return sign + (sig >> 13) + h_exp  # a carry out of sig rounds up into the exponent


@njit(parallel=True, cache=True)
def _narrow(bits, out):
    n = bits.size
    for t in prange((n + _TASK - 1) // _TASK):
        for i in range(t * _TASK, min(n, (t + 1) * _TASK)):
            out[i] = np.uint16(_half_bits(np.int64(bits[i])))


def _memory_order(a):
    """"C" or "F" when ``a`` is contiguous in that order, else None."""
    if a.flags.c_contiguous:
        return "C"
    if a.flags.f_contiguous:
        return "F"
    return None


def to_float32(a):
    """A float32 copy of float16 ``a``, in ``a``'s memory order when contiguous."""
    order = _memory_order(a)
    if order is None or a.size == 0:
        return a.astype(np.float32)
    out = np.empty(a.shape, np.float32, order=order)
    widen(a.ravel(order).view(np.uint16), out.ravel(order))
    return out


def to_float16(y, out=None):
    """float32 ``y`` rounded to float16: into ``out`` when given, else a new array."""
    order = _memory_order(y)
    if out is None:
        if order is None or y.size == 0:
            return y.astype(np.float16)
        out = np.empty(y.shape, np.float16, order=order)
    elif order is None or y.size == 0 or _memory_order(out) != order or out.shape != y.shape:
        np.copyto(out, y, casting="same_kind")
        return out
    narrow(y.ravel(order), out.ravel(order).view(np.uint16))
    return out


def widen(bits, out, hardware=HARDWARE):
    """1-D float16 bit patterns ``bits`` (uint16) -> their float32 values in ``out``."""
    if hardware:
        run_kernel(_widen_hw, bits.size, bits, out)
    else:
        run_kernel(_widen, bits.size, bits, _WIDEN, out)


def narrow(values, out, hardware=HARDWARE):
    """1-D float32 ``values`` -> float16 bit patterns (uint16) in ``out``."""
    if hardware:
        run_kernel(_narrow_hw, values.size, values, out)
    else:
        run_kernel(_narrow, values.size, values.view(np.uint32), out)
