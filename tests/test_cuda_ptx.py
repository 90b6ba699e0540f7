"""Every CUDA kernel compiles for a real GPU (to PTX), for every dtype and layout used
(bfloat16 as its int16 bits, converted by ``_half``'s functions compiled for the GPU).

The simulator runs the kernels as plain Python, so it cannot catch what only Numba's
CUDA compiler rejects (typing, unsupported functions: ``np.sqrt`` in a kernel passes
the simulator and fails here). Compiling to PTX needs NVVM and NVRTC but no GPU:
``pip install nvidia-nvvm nvidia-cuda-nvrtc`` (or a CUDA toolkit) next to numba-cuda;
skipped without them.
"""

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda is not installed")

CC = (8, 0)


@pytest.fixture(scope="module")
def compile_ptx():
    from types import SimpleNamespace

    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    patch = pytest.MonkeyPatch()
    if not cuda.is_available():  # device functions ask the driver for the target; none here
        patch.setattr(dispatcher, "get_current_device",
                      lambda: SimpleNamespace(compute_capability=CC))

    def compile_(fn, sig):
        return cuda.compile_ptx(fn, sig, cc=CC)[0]

    try:
        compile_(lambda a: None, (cuda.types.float32[:],))
    except Exception as exc:  # noqa: BLE001 - NVVM/NVRTC missing, in several guises
        patch.undo()
        pytest.skip(f"cannot compile to PTX here (NVVM/NVRTC missing?): {exc!s:.200}")
    yield compile_
    patch.undo()


def _signatures():
    from numba.cuda import types as t

    vec, part = t.float64[:], t.float64[:, :]
    sigs = {"merge_moments": [(part, part, part, vec, vec)],
            "merge_sums": [(part, part, vec, vec)],
            "norm_coeffs": [(vec, t.float64, vec, t.boolean, vec, t.boolean, vec, vec, vec)],
            "grad_coeffs": [(vec, vec, vec, vec, t.boolean, t.float64, vec, vec, vec, vec)]}
    for dtype in (t.float16, t.float32, t.float64, t.int16):  # int16: bfloat16's bits
        sigs.setdefault("to_float64", []).append((t.Array(dtype, 1, "A"), vec))
        sigs.setdefault("moving_update", []).append((t.Array(dtype, 1, "A"), vec, t.float64))
        for layout in ("C", "A"):  # contiguous views, and strided ones
            r, p = t.Array(dtype, 2, layout), t.Array(dtype, 3, layout)
            for name, a in (("rows", r), ("planes", p)):
                sigs.setdefault(f"stats_{name}", []).append((a, t.int64, part, part, part))
                sigs.setdefault(f"grad_sums_{name}", []).append(
                    (a, a, t.int64, vec, part, part))
                sigs.setdefault(f"affine_{name}", []).append((a, t.int64, vec, vec, vec, a))
                sigs.setdefault(f"grad_input_{name}", []).append(
                    (a, a, t.int64, vec, vec, vec, vec, a))
    return sigs


def test_every_kernel_compiles_to_ptx(compile_ptx):
    from numba.cuda import types

    from numbabn import _kernels_cuda, config

    kernels = _kernels_cuda.kernels(config.CUDA_THREADS_PER_BLOCK)
    sigs = _signatures()
    built = {name for name, fn in vars(kernels).items() if hasattr(fn, "py_func")}
    assert built == set(sigs), "a kernel without signatures here, or the reverse"
    for name, signatures in sigs.items():
        for sig in signatures:
            ptx = compile_ptx(getattr(kernels, name).py_func, sig)
            assert ".local" not in ptx, f"{name} spills to local memory"
            if any(getattr(a, "dtype", None) == types.int16 for a in sig):
                # bfloat16 bits: shifted into float32's top half and reinterpreted
                # (mov.b32), never converted as integers (cvt.*.s16)
                assert ".s16" not in ptx and "mov.b32" in ptx, f"{name}: int16 as integers"
