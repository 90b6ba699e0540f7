"""Tensors in, numbabn's kernels, tensors out: zero-copy views both ways (the Python path).

Eager calls on CPU tensors in torch's memory formats go to the compiled op instead
(``numbabn.torch._native``) when it is built; this module serves the rest: CUDA tensors,
traced code (through ``_ops``' custom operators), other strides, and every call where
the op cannot be built.

A CPU tensor is handed to numbabn as ``t.detach().numpy()``, a NumPy view with the
tensor's strides, so channels-last and channels-last-3d tensors reach the kernels as
they lie in memory (``numbabn._layout`` walks any dense strides without a copy). A CUDA
tensor becomes a Numba device array through its CUDA array interface, without the
stream synchronize Numba would do by default, and numbabn's CUDA kernels are queued on
PyTorch's current stream. Full-size outputs are allocated by PyTorch
(``torch.empty_like``, which keeps the input's memory format) and passed as ``out``.

The per-channel results (mean, biased variance, 1/std; gradient sums) are float64
tensors of shape (C,). ``numba.cuda`` is imported only on the first CUDA tensor.
"""

import functools

import numpy as np
import torch

from .. import _cpu, _device, _pool, batchnorm, config

#: dtypes the module accepts (the rest raise torch's NotImplementedError)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------- the dtype policy
# The one place that decides how a tensor dtype reaches the kernels. NumPy has no
# bfloat16 of its own: a bfloat16 tensor reaches the kernels as an ``ml_dtypes.bfloat16``
# view of its memory (`_full`: a NumPy view on the CPU, a Numba device array on the GPU,
# made from the tensor's int16 view since PyTorch exports no bfloat16 through the CUDA
# array interface), which the CPU and CUDA kernels read and write natively. Without
# ml_dtypes it is computed through one float32 copy, the result rounded back.

def _ml_bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes.bfloat16


_BFLOAT16 = _ml_bfloat16()


def _copied(t):
    """Whether ``t`` (bfloat16 without native support) goes through a float32 copy."""
    return t.dtype == torch.bfloat16 and _BFLOAT16 is None


def _kernel_tensor(t):
    """``t`` as the kernels read it: itself, or a float32 copy (`_copied`)."""
    return t.float() if _copied(t) else t


def _output_like(x):
    """(tensor returned, tensor the kernels write): one tensor unless `_copied`."""
    if _copied(x):
        return torch.empty_like(x), _empty_like(x, torch.float32)
    y = _empty_like(x, x.dtype)
    return y, y


def _finish(y, written):
    if written is not y:
        y.copy_(written)  # float32 -> bfloat16, rounded to nearest even
    return y


# ----------------------------------------------------------------- array plumbing

_STANDARD_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


#: outputs of at least this many bytes come from NumPy's allocator (`_empty_like`)
NUMPY_OUTPUT_BYTES = 256 * 1024


def _empty_like(x, dtype):
    """``torch.empty_like(x, dtype=dtype)``: same shape and strides (the fake
    implementations in ``_ops`` use ``torch.empty_like``, and the real outputs must
    match them), but for large CPU tensors (``NUMPY_OUTPUT_BYTES`` and up) in a standard
    memory format the memory comes from NumPy's allocator, through numbabn's output pool
    (``numbabn._pool``) from 1 MiB on.

    Why: PyTorch's CPU allocator returns a large block to the OS when it is freed and
    takes fresh pages for the next one, so writing a new (64, 64, 56, 56) float32 output
    costs ~50 ms of page faults here on every call (NumPy asks for transparent huge
    pages: ~15 ms; the pool reuses a buffer once nothing holds it: no faults). The train
    forward ran 2.2x faster with NumPy's memory alone.
    The tensor is an ordinary one, except that its storage cannot grow
    (``resize_`` to a larger size raises). Below the threshold torch's allocator reuses
    its cached blocks and ``torch.empty_like`` is ~10x cheaper than the NumPy route
    (~2 us against ~20 us at (64, 256) float32).
    """
    if not x.is_cpu or dtype == torch.bfloat16:
        return torch.empty_like(x, dtype=dtype)
    itemsize = _ITEMSIZE[dtype]
    if x.numel() * itemsize < NUMPY_OUTPUT_BYTES:
        return torch.empty_like(x, dtype=dtype)
    dense = x.is_contiguous() or (
        x.dim() in _STANDARD_FORMATS and x.is_contiguous(memory_format=_STANDARD_FORMATS[x.dim()]))
    if not dense:
        return torch.empty_like(x, dtype=dtype)
    flat = _pool.empty((x.numel(),), _NUMPY_DTYPES[dtype])
    # A tensor of its own, not a view of another tensor: autograd refuses in-place ops
    # (a following ReLU(inplace=True)) on a view returned by a custom Function. So the
    # strides are set in NumPy, with the ndarray constructor (~2 us; as_strided ~5).
    strides = [s * itemsize for s in x.stride()]
    return torch.from_numpy(np.ndarray(x.shape, flat.dtype, flat, 0, strides))


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32,
                 torch.float64: np.float64}
_ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}

def _is_cuda(t):
    return t.device.type == "cuda"


def _full(t):
    """A full-size tensor as a numbabn array: NumPy view, or Numba view on the GPU."""
    t = t.detach()
    bfloat16 = t.dtype == torch.bfloat16
    if bfloat16:  # neither Tensor.numpy nor the CUDA array interface takes it: its bits
        t = t.view(torch.int16)
    if _is_cuda(t):
        # sync=False: the interface names PyTorch's current stream, and Numba would wait
        # for it on the host; the kernels go on that same stream instead (`_scope`)
        a = _device.cuda().as_cuda_array(t, sync=False)
    else:
        a = t.numpy()
    return a.view(_BFLOAT16) if bfloat16 else a


def _vector(v):
    """A per-channel tensor (or None) as a float64 array on its device (C values)."""
    if v is None:
        return None
    v = v.detach().to(torch.float64)
    return _full(v)


def _tensor(a, like):
    """A numbabn result (NumPy or Numba array) as a tensor on ``like``'s device, no copy."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


@functools.lru_cache(maxsize=64)
def _numba_stream(handle):
    """One Numba object per PyTorch stream (``_cuda`` caches launches by stream)."""
    return _device.cuda().external_stream(handle)


class _scope:
    """Run numbabn's GPU work on PyTorch's current stream of ``x``'s device; nothing on
    the CPU (so the CPU path never imports ``numba.cuda``)."""

    def __init__(self, x):
        self.x = x
        self.stack = []

    def __enter__(self):
        if _is_cuda(self.x):
            cuda = _device.cuda()
            index = self.x.device.index or 0
            stream = torch.cuda.current_stream(self.x.device).cuda_stream
            for cm in (cuda.gpus[index], _device.on_stream(_numba_stream(stream))):
                cm.__enter__()
                self.stack.append(cm)
        return self

    def __exit__(self, *exc):
        while self.stack:
            self.stack.pop().__exit__(*exc)
        return False


# ------------------------------------------------------------------ the operations

# The CPU path for float32 and float64 tensors calls numbabn's CPU backend (``_cpu``)
# directly: the module has checked what the public NumPy functions would (shapes,
# dtypes, eps > 0, a non-empty batch), and their validation costs ~20 us a call.
# Everything else (float16, bfloat16, CUDA) goes through the public functions.

_DIRECT = (torch.float32, torch.float64)


def direct(x):
    """Whether ``x`` takes the direct CPU path (a float32 or float64 CPU tensor)."""
    return x.is_cpu and x.dtype in _DIRECT


def _array(t):
    """A CPU tensor's NumPy view (``detach`` only when it needs one: ~1 us)."""
    return (t.detach() if t.requires_grad else t).numpy()


def _param_arrays(n, *vs):
    """Per-channel CPU tensors (or None) as the kernels take them, for an input of ``n``
    elements (the module has checked that they share a dtype).

    float64 tensors, and float32 ones below ``config.SERIAL_BELOW`` elements: their
    NumPy views as they are. The kernels read every per-channel value as a float64
    (``v[c]`` in float64 arithmetic), so a float32 view gives the bits of its float64
    copy; it only compiles the serial kernels once more, for float32 vectors, and saves
    the copy, which costs as much as the kernel at (64, 256). Above the threshold, where
    the parallel kernels run and the copy is noise, and with a parameter missing: each
    one's float64 copy, so the parallel kernels (and the TensorFlow op's entry points)
    stay compiled for float64 vectors alone. (One ``astype`` each, timed in one process
    against one ``torch.cat`` and one ``astype``: weight and bias 9.5 against 17.6 us;
    all four the same, 17.0 against 16.1.)
    """
    present = [v for v in vs if v is not None]
    if not present:
        return vs
    dtype = present[0].dtype
    if len(present) == len(vs) and (dtype == torch.float64 or (
            dtype == torch.float32 and n < config.SERIAL_BELOW)):
        return [_array(v) for v in vs]
    return [None if v is None else _array(v).astype(np.float64) for v in vs]


def train_direct(x, weight, bias, eps):
    """The direct CPU path of `train`: ``(y, mean, var, invstd)``, y a tensor and the
    statistics float64 NumPy arrays."""
    y = _empty_like(x, x.dtype)
    _, mean, var, invstd = _cpu.train(_array(x), 1, *_param_arrays(x.numel(), weight, bias),
                                      eps, y.numpy())
    return y, mean, var, invstd


def inference_direct(x, weight, bias, running_mean, running_var, eps):
    """The direct CPU path of `inference` (a negative running variance gives NaN in its
    channel, as torch's kernel does)."""
    y = _empty_like(x, x.dtype)
    params = _param_arrays(x.numel(), weight, bias, running_mean, running_var)
    _cpu.inference(_array(x), 1, *params, eps, y.numpy())
    return y


def backward_direct(dy, x, weight, mean, invstd, training):
    """The direct CPU path of `backward`: ``mean``/``invstd`` float64 arrays, ``dy`` a
    CPU tensor of ``x``'s dtype; ``(dx, dweight, dbias)``, the last two arrays."""
    dx = _empty_like(x, x.dtype)
    dy_a, x_a, (w,) = _array(dy), _array(x), _param_arrays(x.numel(), weight)
    if training:
        _, dweight, dbias = _cpu.backward(dy_a, x_a, 1, w, mean, invstd, dx.numpy())
    else:
        dweight, dbias = _constant_stats_backward(dy_a, x_a, w, mean, invstd, dx.numpy())
    return dx, dweight, dbias


def train(x, weight, bias, eps):
    """``(y, mean, var, invstd)``: batch statistics (float64, biased variance) and y."""
    if direct(x):
        y, *stats = train_direct(x, weight, bias, eps)
        return (y, *(torch.from_numpy(a) for a in stats))
    y, written = _output_like(x)
    with _scope(x):
        _, stats = batchnorm.batch_norm_train(_full(_kernel_tensor(x)), _vector(weight),
                                        _vector(bias), axis=1, eps=eps, out=_full(written))
    return (_finish(y, written), _tensor(stats.mean, x), _tensor(stats.var, x),
            _tensor(stats.invstd, x))


def inference(x, weight, bias, running_mean, running_var, eps):
    """``x`` normalized with the running statistics."""
    if direct(x):
        return inference_direct(x, weight, bias, running_mean, running_var, eps)
    y, written = _output_like(x)
    with _scope(x):
        batchnorm.batch_norm_inference(_full(_kernel_tensor(x)), _vector(weight), _vector(bias),
                                 _vector(running_mean), _vector(running_var), axis=1,
                                 eps=eps, out=_full(written))
    return _finish(y, written)


def backward(dy, x, weight, mean, invstd, training):
    """``(dx, dweight, dbias)``, the last two float64 (C,).

    ``training``: the statistics were the batch's own (numbabn's closed-form
    `batch_norm_backward`); otherwise they were constants (the running statistics), and
    ``dx = dy * weight * invstd`` with the same two per-channel sums for the parameters.
    """
    if direct(x) and dy.dtype == x.dtype and dy.is_cpu:
        m, s = (_array(v.to(torch.float64)) for v in (mean, invstd))
        dx, dweight, dbias = backward_direct(dy, x, weight, m, s, training)
        return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)
    dx, written = _output_like(x)
    dy, x = _kernel_tensor(dy), _kernel_tensor(x)
    with _scope(x):
        dy_a, x_a, w, m, s = _full(dy), _full(x), _vector(weight), _vector(mean), _vector(invstd)
        if training:
            _, dweight, dbias = batchnorm.batch_norm_backward(
                dy_a, x_a, w, batchnorm.BatchStats(m, None, s), axis=1, out=_full(written))
        else:
            dweight, dbias = _constant_stats_backward(dy_a, x_a, w, m, s, _full(written))
    return _finish(dx, written), _tensor(dweight, x), _tensor(dbias, x)


def _constant_stats_backward(dy, x, gamma, mean, invstd, out):
    """Eval-mode gradients with numbabn's backward passes (no public function covers
    them): the gradient sums, then ``dx = k_dy * dy`` (the batch terms set to zero)."""
    backend = batchnorm._backend(x=x, dy=dy, out=out)
    channels = x.shape[1]
    sum_dy, sum_dy_xmu = backend.grad_sums(batchnorm._kernel_dtype(dy, backend),
                                           batchnorm._kernel_dtype(x, backend), 1, mean)
    dgamma, k_dy, _, _ = backend.grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma,
                                             x.size // channels)
    zeros = np.zeros(channels)
    dx = backend.grad_input(batchnorm._kernel_dtype(dy, backend),
                            batchnorm._kernel_dtype(x, backend), 1, mean, k_dy, zeros, zeros,
                            batchnorm._direct_out(out, x, backend))
    batchnorm._result(dx, x.dtype, out, out)
    return dgamma, sum_dy
