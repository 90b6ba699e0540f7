"""numbabn.torch's compiled op (``numbabn.torch._native``): taken by default for CPU
tensors in torch's memory formats, the Python path's bits, no copies, its buffer pool,
and the fallback without a compiler."""

import os

import pytest

torch = pytest.importorskip("torch")

import torch_cases as tc  # noqa: E402
from helpers import run_python  # noqa: E402

from numbabn import config  # noqa: E402
from numbabn.torch import _bridge, _native, modules  # noqa: E402

pytestmark = pytest.mark.skipif(
    not modules._NATIVE_ENABLED, reason="NUMBABN_TORCH_OP=0: the compiled op is switched off")

#: torch's layouts, and channels-first maps of short runs (inner < LANES: the entry points
#: of ``train_short``/``backward_short``) and of a single element
LAYOUTS = tc.LAYOUTS + [("NCHW-short", (6, 5, 3, 4), 2, torch.contiguous_format),
                        ("NCL-1", (7, 3, 1), 1, torch.contiguous_format)]
LAYOUT_IDS = [layout[0] for layout in LAYOUTS]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OPTIONS = [dict(), dict(momentum=None), dict(bias=False), dict(affine=False),
           dict(track_running_stats=False)]


def _run(module, x, dy, steps=2):
    """Training steps then an eval step: outputs, every gradient, the buffers."""
    out = []
    for training in [True] * steps + [False]:
        module.train(training)
        module.zero_grad()
        xg = x.detach().clone().requires_grad_(True)
        y = module(xg)
        y.backward(dy)
        out += [y.detach(), xg.grad] + [p.grad for p in module.parameters()]
        out += [b.clone() for b in module.buffers()]
    return out


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "cumulative", "no-bias",
                                                  "no-affine", "untracked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_the_compiled_op_gives_the_python_paths_bits(layout, dtype, options, monkeypatch):
    """Outputs (and their strides), input and parameter gradients, running statistics
    and num_batches_tracked after two training steps and an eval step: bit for bit."""
    _, shape, kind, memory_format = layout
    x = tc.make_x(shape, memory_format, dtype, seed=1, loc=30.0)
    dy = tc.make_x(shape, memory_format, dtype, seed=2)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(modules, "_NATIVE_ENABLED", native)
        results[native] = _run(tc.pair(kind, shape[1], dtype, seed=3, **options)[0], x, dy)
    for a, b in zip(results[True], results[False], strict=True):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_the_compiled_op_runs_and_copies_nothing(layout, monkeypatch):
    """CPU tensors in torch's memory formats never reach the Python path, and no
    full-size tensor is copied (x, dy and the outputs are read and written in place)."""
    def python_path(*args, **kwargs):
        raise AssertionError("the Python path ran")

    for name in ("train_direct", "inference_direct", "backward_direct", "train",
                 "inference", "backward"):
        monkeypatch.setattr(_bridge, name, python_path)
    _, shape, kind, memory_format = layout
    module = tc.OURS[kind](shape[1])
    x = tc.make_x(shape, memory_format, torch.float32, seed=0).requires_grad_(True)
    for training in (True, False):
        with torch.profiler.profile(record_shapes=True) as prof:
            y = module.train(training)(x)
            y.backward(torch.ones_like(y))
        assert y.is_contiguous(memory_format=memory_format)
        copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone",
                                                         "aten::contiguous")
                  and list(shape) in e.input_shapes]
        assert not copies, [(e.name, e.input_shapes) for e in copies]


def test_results_do_not_depend_on_the_thread_count():
    """Inputs over config.TORCH_SERIAL_BELOW run their tasks on PyTorch's pool; the
    partial results merge in task order, so one, two and three threads give the same
    bits."""
    shape = (8, 16, 64, 64)
    assert 8 * 16 * 64 * 64 >= config.TORCH_SERIAL_BELOW
    x = tc.make_x(shape, torch.contiguous_format, torch.float32, seed=5, loc=1e4)
    dy = tc.make_x(shape, torch.contiguous_format, torch.float32, seed=6)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(_run(tc.pair(2, 16, torch.float32, seed=7)[0], x, dy, steps=1))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_pooled_outputs_are_not_reused_while_held_and_memory_stays_bounded():
    """Outputs of 256 KiB and more come from the op's buffer pool: an output still held
    (here with the autograd graph of its step, as a training loop holds activations)
    keeps its buffer and its values; freed ones are reused, so the pool stays small."""
    module = tc.OURS[2](16)
    x = tc.make_x((8, 16, 32, 32), torch.contiguous_format, torch.float32, seed=8)
    x.requires_grad_(True)
    assert x.numel() * 4 >= 256 * 1024
    held = [module(x) for _ in range(3)]
    assert len({y.data_ptr() for y in held}) == 3
    want = held[0].clone()
    cached = _native.pool_cached_bytes()  # the pool is the process's: other tests' too
    for _ in range(200):
        module(x).sum().backward()
    for y in held:
        assert torch.equal(y, want)
    # each step's output and gradient are freed before the next step: reused, so the
    # pool grows by a buffer or two, not by 400
    assert _native.pool_cached_bytes() <= cached + 2 * x.numel() * 4


def _vm_flags(address):
    """The VmFlags of the mapping of this process that holds ``address``."""
    start = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                start = lo if lo <= address < hi else None
            elif head == "VmFlags:" and start is not None:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="no transparent huge pages on this system (Linux only)")
def test_pooled_buffers_of_2_mib_and_more_ask_for_huge_pages():
    """A 51 MB activation on 4 KiB pages is 12,500 TLB entries a sweep; the pool asks
    for transparent huge pages (MADV_HUGEPAGE, the advice NumPy gives its own large
    arrays) on buffers aligned to 2 MiB. Before, the advice went to malloc's unaligned
    block, madvise refused it (EINVAL) and nothing said so: the mapping has no ``hg``."""
    module = tc.OURS[2](16).eval()
    x = tc.make_x((8, 16, 64, 64), torch.contiguous_format, torch.float32, seed=9)
    y = module(x)
    assert y.numel() * 4 >= 2 << 20
    assert y.data_ptr() % (2 << 20) == 0
    assert "hg" in _vm_flags(y.data_ptr())


FALLBACK = """
    import warnings
    import torch
    import numbabn.torch as nbt
    from numbabn.torch import _native
    x = torch.randn(8, 3, 5, 5)
    ours, stock = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x)
        ours(x)
    torch.testing.assert_close(y, stock(x))
    notes = [str(w.message) for w in caught if "PyTorch op" in str(w.message)]
    print(len(notes), notes[0] if notes else "", _native.status())
"""


def test_without_a_compiler_the_modules_fall_back_with_one_note(tmp_path):
    proc = run_python(FALLBACK, CXX="/bin/false", NUMBABN_OP_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 "), proc.stdout
    assert "could not be compiled" in proc.stdout and "Python path" in proc.stdout


def test_opting_out_uses_the_python_path_silently():
    proc = run_python(FALLBACK, NUMBABN_TORCH_OP="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 "), proc.stdout


def test_concurrent_calls_from_python_threads_are_safe():
    """Modules called from several threads at once (a data-parallel loop, a serving
    pool): each thread's results are those of the same calls made one after another
    (the op keeps no state between calls but its buffer pool, which is locked)."""
    import threading

    shapes = [(8, 16, 32, 32), (16, 24, 6, 6), (64, 40)]  # pooled, short runs, rows
    xs = [tc.make_x(s, torch.contiguous_format, torch.float32, seed=i)
          for i, s in enumerate(shapes)]
    dys = [tc.make_x(s, torch.contiguous_format, torch.float32, seed=10 + i)
           for i, s in enumerate(shapes)]

    def work(i):
        module = tc.pair(1 if len(shapes[i]) == 2 else 2, shapes[i][1], torch.float32,
                         seed=i)[0]
        return _run(module, xs[i], dys[i], steps=3)

    want = [work(i) for i in range(len(shapes))]
    got = {}
    errors = []

    def thread(i, k):
        try:
            for _ in range(5):
                got[(i, k)] = work(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread, args=(i, k)) for i in range(len(shapes))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, _), results in got.items():
        for a, b in zip(results, want[i], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("x_grad, params_grad", [(True, False), (False, True)],
                         ids=["frozen-parameters", "input-without-grad"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_only_the_wanted_gradients(x_grad, params_grad, training, monkeypatch):
    """Frozen BN parameters (fine-tuning) and an input that needs no gradient (a first
    layer): the op computes what autograd asks for, the Python path's bits."""
    x = tc.make_x((6, 5, 4, 4), torch.contiguous_format, torch.float32, seed=11, loc=3.0)
    dy = tc.make_x((6, 5, 4, 4), torch.contiguous_format, torch.float32, seed=12)
    results = {}
    for native in (True, False):
        monkeypatch.setattr(modules, "_NATIVE_ENABLED", native)
        module = tc.pair(2, 5, torch.float32, seed=13)[0].train(training)
        module.requires_grad_(params_grad)
        xg = x.detach().clone().requires_grad_(x_grad)
        y = module(xg)
        y.backward(dy)
        results[native] = [y.detach(), xg.grad, module.weight.grad, module.bias.grad]
    for a, b in zip(results[True], results[False], strict=True):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    assert (results[True][1] is None) != x_grad
    assert (results[True][2] is None) != params_grad


def test_direct_calls_of_the_op_check_their_arguments():
    """The modules check everything first; the op itself still refuses what would make
    the entry points read out of bounds (a direct ``torch.ops.numbabn_native`` call)."""
    op = _native.ensure("float32")
    x = torch.randn(4, 3)
    bad = [((x, torch.ones(2), None, None, None, True, 0.1, 1e-5), "weight must be"),
           ((torch.randn(0, 3), None, None, None, None, True, 0.1, 1e-5), "non-empty"),
           ((torch.randn(4), None, None, None, None, True, 0.1, 1e-5), "non-empty"),
           ((x, None, torch.ones(3, dtype=torch.int64), None, None, True, 0.1, 1e-5),
            "bias must be"),
           ((x, None, None, torch.zeros(3), None, True, 0.1, 1e-5), "given together"),
           ((x, None, None, None, torch.ones(3), False, 0.0, 1e-5), "running_mean must")]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*args)
