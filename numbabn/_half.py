"""Half-precision storage (float16, bfloat16) for the kernels: conversions in registers.

Numba has no float16 or bfloat16 type on the CPU, so the kernels see a half array as a
view of its 16-bit patterns (`storage_view`): float16 as ``uint16``, bfloat16
(``ml_dtypes.bfloat16``, the dtype TensorFlow and JAX use) as ``int16``. Two integer
dtypes, so that Numba compiles one specialization of each kernel per format and the
element type alone picks the conversion: a kernel reads an element with
``widen(x[i])`` (its float64 value) and writes one with ``y[i] = narrow(v, y.dtype)``
(``v`` rounded once to the storage format). For float32 and float64 arrays these are
the plain casts, so the same kernel source serves all four dtypes.

Reading is exact: float16 -> float32 is the CPU's conversion instruction where it has
one (``HARDWARE``: x86 F16C ``vcvtph2ps``, vectorized; AArch64 ``fcvt``), otherwise a
lookup in a 65536-entry table NumPy built; bfloat16 -> float32 is a 16-bit shift.

Writing rounds the float64 result once, to nearest even, as a direct conversion would.
A plain float64 -> float32 -> half chain rounds twice: a value just above a half-way
point can land on it and then round down. float16: float64 is first rounded *to odd*
onto float32 (`_to_odd_float32`: truncate, set the last bit when anything was dropped;
integer operations on the bits), then to nearest even by F16C's ``vcvtps2ph`` (or NumPy's
bit algorithm, ``npy_floatbits_to_halfbits``). Rounding to odd with at least two more
bits than the target keeps the final rounding correct (Boldo & Melquiond, "Emulation of
FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008);
float32 has 13 more than float16. bfloat16: rounded to nearest even directly on the
float64 bits (`f64_to_bf16`), which carries into the exponent and so overflows to
infinity at the right place. NaNs stay NaNs (sign and top payload bits kept, quiet bit
set). Each step is a select or an integer operation, so the kernels' loops vectorize;
measured in cache on one core here, (x - m) * s + b over 128 k elements: float32
1.45-1.7, float16 1.2-1.4, bfloat16 0.73-0.92 G elements/s (the first float16 version,
rounding to odd with a float32 -> float64 round trip, 0.86-1.09; bfloat16 through it
0.24-0.26, its scalar float64 -> int64 conversions did not vectorize).

The kernels get these functions inlined, so NumPy-API calls on half arrays move 2-byte
elements only: no converted copy of the input or the output.

The CUDA kernels use the same element access, these very definitions: `widen` and
`narrow`'s overloads are generic (numba-cuda installs generic overloads of other
packages into its typing), and a CPU ``@njit`` function called from device code is
compiled by numba-cuda from its Python source as a device function, so `bf16_to_f64`
and `f64_to_bf16` run on the GPU as written here (their bit casts are generic
intrinsics too; they use nothing numba-cuda lacks: ``math.copysign``, not NumPy's
ufunc). tests/test_cuda_ptx.py compiles every kernel so. numba-cuda has a float16 type,
so on the GPU float16 is read natively and only bfloat16 is a view of its bits
(`cuda_storage_view`). There the float64 -> float32 step of a NaN may give the
canonical NaN: NaN stays NaN, its sign and payload are not promised on the GPU. Under
the CUDA simulator, which runs kernels as Python, `widen` and `narrow` run as Python
functions that call the CPU's compiled conversions.

Note: Numba's cache tracks the source file of a cached function only. Editing this
module does not invalidate the kernels compiled from ``_kernels_cpu`` (delete
``numbabn/__pycache__/*.nbi`` after an edit).
"""

import math
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ._cache import lock_saves


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

#: float16 bit pattern -> its float32 value (the portable widening)
_WIDEN = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


# ------------------------------------------------------------------- dtypes and views

def is_bfloat16(dtype):
    """Whether ``dtype`` is ml_dtypes' bfloat16, without importing ml_dtypes."""
    return dtype.kind == "V" and dtype.name == "bfloat16" and dtype.itemsize == 2


def is_half(dtype):
    return dtype == np.float16 or is_bfloat16(dtype)


#: storage view dtype of each half format (see the module docstring)
_VIEW = {"float16": np.dtype(np.uint16), "bfloat16": np.dtype(np.int16)}


def storage_view(a):
    """``a`` as the CPU kernels take it: a float16/bfloat16 array as a view of its bits
    (uint16/int16), any other array as is. Works on strided arrays (same item size)."""
    if a is None or not is_half(a.dtype):
        return a
    return a.view(_VIEW[a.dtype.name])


def cuda_storage_view(a):
    """``a`` as the CUDA kernels take it: bfloat16 as a view of its bits (int16), any other
    array as is (numba-cuda has a float16 type: float16 is read natively there). ``a`` is
    a Numba device array (or the simulator's), whose ``view`` keeps shape and strides."""
    if a is None or not is_bfloat16(a.dtype):
        return a
    return a.view(_VIEW["bfloat16"])


# --------------------------------------------------------------- scalar conversions

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


@intrinsic
def _float_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(cache=True)
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


@intrinsic
def _double_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def _bits_double(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@njit(cache=True)
def _to_odd_float32(d):
    """float64 ``d`` rounded to odd onto float32's last bit (bit 29 of the float64): the
    29 bits below it cleared, and bit 29 set if any of them was set; the float32
    conversion is then exact. Infinities and NaNs keep their class. Below 2**-126 float32
    rounds again on its subnormal grid, but all such values are 0 in float16. (Setting
    the low bits instead of clearing them saves an operation but turns inf into NaN.)"""
    b = _double_bits(d)
    # (b & M) + M carries into bit 29 exactly when a low bit is set: or-ed into b, then
    # the low bits cleared (4 integer operations; the compare-and-shift took 5)
    return np.float32(_bits_double((b | ((b & 0x1FFFFFFF) + 0x1FFFFFFF)) & ~0x1FFFFFFF))


@njit(cache=True)
def half_to_f64_hw(bits):
    return np.float64(_half_to_float(bits))


@njit(cache=True)
def half_to_f64_sw(bits):
    return np.float64(_WIDEN[bits])


@njit(cache=True)
def f64_to_half_hw(d):
    return _float_to_half(_to_odd_float32(d))


@njit(cache=True)
def f64_to_half_sw(d):
    return np.uint16(_half_bits(np.int64(_float_bits(_to_odd_float32(d)))))


@njit(cache=True)
def bf16_to_f64(bits):
    return np.float64(_bits_float(np.uint32(np.int64(np.uint16(bits)) << 16)))


@njit(cache=True)
def _bf16_round_normal(d):
    """float64 ``d`` rounded to nearest even at bfloat16's last bit (bit 45) on its bits:
    correct for every ``d`` of magnitude >= 2**-126 (infinities included), not NaN."""
    u = _double_bits(d)
    return _bits_double((u + 0xFFFFFFFFFFF + ((u >> 45) & 1)) & ~0x1FFFFFFFFFFF)


@njit(cache=True)
def _bf16_top(v):
    """bfloat16 bits of a float64 ``v`` float32 holds exactly (or a NaN): its top half."""
    return np.int16(np.uint16(_float_bits(np.float32(v)) >> np.uint32(16)))


@njit(cache=True)
def f64_to_bf16_normal(d):
    """`f64_to_bf16` without its selects (about half its operations): the same bits
    wherever `_bf16_block_rare` does not flag the result."""
    return _bf16_top(_bf16_round_normal(d))


@njit(cache=True)
def f64_to_bf16(d):
    """To nearest even on the float64 bits at bfloat16's last bit (bit 45): the rounded
    value has 8 significant bits, so float32 holds it exactly (or overflows to inf,
    correctly, past the largest bfloat16), and bfloat16 is float32's top half. Below
    2**-126, onto bfloat16's subnormal grid (2**-133) by an addition.
    All selects, so that the loops around it vectorize (AVX2: 4 lanes)."""
    v = _bf16_round_normal(d)
    # below 2**-126 bfloat16's grid is 2**-133 (subnormals): adding 1.5 * 2**-81, whose
    # float64 ulp that is, rounds d onto it once; subtracting it back is exact
    a = abs(d)
    sub = math.copysign((a + _SUBNORMAL_ROUNDER) - _SUBNORMAL_ROUNDER, d)  # keeps -0.0
    v = sub if a < _2_M126 else v
    v = d if d != d else v  # float32 keeps a NaN's sign and top payload, and quiets it
    return _bf16_top(v)


_SUBNORMAL_ROUNDER, _2_M126 = 1.5 * 2.0 ** -81, 2.0 ** -126  # constants in compiled code
_half_to_f64 = half_to_f64_hw if HARDWARE else half_to_f64_sw
_f64_to_half = f64_to_half_hw if HARDWARE else f64_to_half_sw


# --------------------------------------------------------- the kernels' element access

def widen(v):
    """A stored element's float64 value (see the module docstring).

    In compiled code (CPU and CUDA kernels) an overload per element type, ``_widen``.
    Called from Python, as the CUDA simulator runs the kernels, the same compiled
    conversions on a NumPy scalar."""
    if isinstance(v, np.int16):
        return bf16_to_f64(v)
    if isinstance(v, np.uint16):
        return _half_to_f64(v)
    return np.float64(v)


def narrow(v, dtype):
    """float64 ``v`` as an element of ``dtype`` (a storage dtype), rounded once; from
    Python (the CUDA simulator) as a NumPy scalar, as `widen`."""
    if dtype == np.int16:
        return np.int16(f64_to_bf16(v))
    if dtype == np.uint16:
        return np.uint16(_f64_to_half(v))
    return dtype.type(v)


@overload(widen, inline="always")
def _widen(v):
    if v == types.uint16:
        return lambda v: _half_to_f64(v)
    if v == types.int16:
        return lambda v: bf16_to_f64(v)
    if isinstance(v, types.Float):
        return lambda v: np.float64(v)
    return None


@overload(narrow, inline="always")
def _narrow(v, dtype):
    t = getattr(dtype, "dtype", None)
    if t == types.uint16:
        return lambda v, dtype: _f64_to_half(v)
    if t == types.int16:
        return lambda v, dtype: f64_to_bf16(v)
    if t == types.float32:
        return lambda v, dtype: np.float32(v)
    if t == types.float64:
        return lambda v, dtype: np.float64(v)
    if t == types.float16:  # CUDA only: the store converts, once (cvt.rn.f16.f64)
        return lambda v, dtype: v
    return None


# ------------------------------------------------- blocks: the fast path and its exceptions

def staged_dtype(dtype):
    """Whether the CPU kernels write outputs of the Numba element type ``dtype`` by blocks
    (`narrow_block`): bfloat16's storage view (int16), whose rare cases that takes out of
    the loop. Not float16, which has none: staged, its passes ran 8-16% slower in memory
    (faster in cache). Asked while a kernel is typed (``_kernels_cpu._by_output_dtype``),
    so that only one of the two versions is compiled for a dtype."""
    return dtype == types.int16


def narrow_fast(v, dtype):
    """`narrow`'s result for every ``v`` whose result `block_rare` does not flag."""
    if dtype == np.int16:
        return np.int16(f64_to_bf16_normal(v))
    return narrow(v, dtype)


def block_rare(y):
    """Whether a block `narrow_fast` wrote needs `narrow` itself: bfloat16 bits with the
    exponent field all zeros or all ones (zero, subnormal, infinity, NaN); never for the
    other formats."""
    return bool(_bf16_block_rare(y)) if y.dtype == np.int16 else False


@njit(cache=True)
def _bf16_block_rare(y):
    """See `block_rare`. `f64_to_bf16_normal` differs from `f64_to_bf16` only where this
    is True: a NaN's rounding on the bits gives a NaN, an infinity or (the carry through
    the exponent into the sign) a zero or a subnormal; a value below 2**-126 gives a
    float32 subnormal, or exactly 2**-126 (exponent field 1) when it is at least
    2**-126 - 2**-135, where the correct result is 2**-126 too; infinities and overflows
    give infinity. Tested on the outputs, 16-bit lanes: ~4 operations per 16 elements
    (tested on the float64 values, ~5 per 4: 0.72 instead of 0.85 elements/cycle)."""
    rare = False
    for i in range(y.size):
        rare |= np.int16(np.int16(y[i] & 0x7F80) + np.int16(0x80)) <= np.int16(0x80)
    return rare


@overload(narrow_fast, inline="always")
def _narrow_fast(v, dtype):
    if getattr(dtype, "dtype", None) == types.int16:
        return lambda v, dtype: f64_to_bf16_normal(v)
    return lambda v, dtype: narrow(v, dtype)


@overload(block_rare, inline="always")
def _block_rare(y):
    if y.dtype == types.int16:
        return lambda y: _bf16_block_rare(y)
    return lambda y: False


@njit(cache=True)
def narrow_block(t, y):
    """``y[i] = narrow(t[i], y.dtype)`` for a float64 block ``t`` (1-D, as long as ``y``).

    Writes the block with `narrow_fast` and, only when `block_rare` flags the result,
    again with `narrow`: the common loop has no select for the rare cases (bfloat16:
    about half the operations; measured in cache, one core, 256-element blocks,
    elements/cycle: narrow 0.57, narrow_block 0.85). Values staged in ``t`` rather than
    recomputed: ``y`` may be the input (in place)."""
    for i in range(t.size):
        y[i] = narrow_fast(t[i], y.dtype)
    if block_rare(y):
        for i in range(t.size):
            y[i] = narrow(t[i], y.dtype)


# every cached function above saves to Numba's cache under a lock (see numbabn._cache)
lock_saves(globals().values())
