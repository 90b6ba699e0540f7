"""numbabn.torch.SyncBatchNorm under torch.distributed: 2 gloo processes on the CPU.

Two ranks (tests/torch_sync_worker.py) join a gloo group on a free localhost port and
train Conv2d -> SyncBatchNorm -> ReLU -> Linear -> SyncBatchNorm -> ReLU -> Linear with
SGD for 4 steps, each rank on its own, differently sized share of the step's global
batch (one share empty); the test's own process trains the same model, from the same
initial weights, on the whole batches without a group. The ranks must hold the same bits, and
equal the single process within float32 rounding of the reordered sums.

Every process runs under a deadline; as soon as one fails, or the deadline passes, all
are killed with SIGKILL and the test fails with each one's status and output tail, so
a dead or missing rank fails the test in seconds instead of hanging it (a rank whose
peer is gone waits in a collective until the group's timeout otherwise).
"""

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import torch_sync_worker as sw  # noqa: E402
from process_group import WorkerFailure, free_ports, run_processes  # noqa: E402

HERE = Path(__file__).parent
WHAT = "synchronized run"
WORKER = HERE / "torch_sync_worker.py"
# A healthy run takes ~5-10 s on 2 busy cores (two PyTorch start-ups, 4 steps); the
# deadline leaves a loaded CI machine 20x that. A dead rank fails the run at once (its
# exit status), not by the deadline; the ranks' group timeout is longer still
# (torch_sync_worker.TIMEOUT_S), so only this harness decides.
TIMEOUT = 180
#: a dead rank fails the test within this many seconds
FAIL_FAST = 30
# The missing-rank test can only end by timing out.
SHORT_TIMEOUT = 8

# Tolerance against the single process, as a fraction of each array's scale
# max(1, max|reference|). The runs differ only in the order of sums: BN statistics are
# float64 Chan merges (off by float64 rounding, below an ulp of float32 after rounding),
# the BN gradient sums float64 too; a parameter's float32 gradient sums K <= 8 * 6 * 6 =
# 288 terms (the conv layers' N x H x W) in one reduction in the single process, as two
# per-rank partial sums plus the all-reduce in the group, and a reordered sum of K terms
# differs by at most (K - 1) * eps32 of the sum of their magnitudes. Each of the S = 4
# steps adds such a difference to the weights, and later steps carry it through the
# network (BN's 1 / std, O(1) weights); 16x covers that amplification:
# 16 * S * (K - 1) * eps32 = 2.2e-3. Observed: see the test's printout.
STEPS, K = len(sw.SHARES), max(sum(s) for s in sw.SHARES) * sw.SIZE * sw.SIZE
REL_TOL = 16 * STEPS * (K - 1) * 2.0 ** -23


def _env(**extra):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", NUMBA_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("SYNC_DIE_AFTER_STEP", None)
    env.update(extra)
    return env


def _ranks(tmp_path, extra_env=None):
    port = str(free_ports(1)[0])
    extra_env = extra_env or {}
    return {f"rank {r}": (["rank", str(r), "2", port, str(tmp_path / f"rank{r}.npz")],
                          _env(**extra_env.get(r, {})))
            for r in (0, 1)}


def test_two_ranks_agree_bitwise_and_equal_one_process_on_the_whole_batch(tmp_path):
    run_processes(WORKER, _ranks(tmp_path), tmp_path, TIMEOUT, WHAT)
    r0, r1 = (dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1))
    # the single process is this one (no group: SyncBatchNorm normalizes the whole batch)
    ref = {k: np.asarray(v) for k, v in sw.train().items()}

    # unequal shares, one empty, adding up to the single process's batches
    assert list(r0.pop("examples")) == [s[0] for s in sw.SHARES]
    assert list(r1.pop("examples")) == [s[1] for s in sw.SHARES]
    assert list(ref.pop("examples")) == [sum(s) for s in sw.SHARES]

    state = [k for k in ref if k.startswith("state.")]
    assert {"state.1.running_var", "state.5.running_mean", "state.5.num_batches_tracked"} \
        <= set(state)
    for k in state:
        assert r0[k].dtype == r1[k].dtype == ref[k].dtype, k
        assert r0[k].tobytes() == r1[k].tobytes(), f"{k}: the ranks differ"

    # each rank's per-example results are its rows of the whole batch's
    diffs = {}
    for k in ref:
        got = r0[k] if k.startswith("state.") else np.concatenate([r0[k], r1[k]])
        scale = max(1.0, float(np.max(np.abs(ref[k]), initial=0.0)))
        diffs[k] = float(np.max(np.abs(got.astype(np.float64) - ref[k]), initial=0.0)) / scale
        assert diffs[k] <= REL_TOL, (k, diffs[k])
    # training happened: the running statistics left their initial values
    assert np.all(np.abs(ref["state.1.running_mean"]) > 1e-3)
    assert int(ref["state.1.num_batches_tracked"]) == STEPS
    print(f"max |2 ranks - 1 process| / scale (tolerance {REL_TOL:.1e}): "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(diffs.items(), key=lambda kv: -kv[1])[:6]))


def test_a_rank_that_dies_fails_the_run_at_once(tmp_path):
    """Rank 1 exits (status 3) after its second step: the run fails well before the
    deadline, both ranks are gone, and the failure shows rank 1's last output."""
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        run_processes(WORKER, _ranks(tmp_path, {1: {"SYNC_DIE_AFTER_STEP": "1"}}),
                      tmp_path, TIMEOUT, WHAT)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "rank 1 exited with status 3" in message
    assert "dying on purpose" in message and "--- rank 0" in message
    assert elapsed < FAIL_FAST, elapsed


def test_a_missing_rank_fails_by_the_deadline(tmp_path):
    """Only rank 0 starts: it waits for rank 1 to join, and the harness kills it at the
    deadline."""
    start = time.monotonic()
    specs = _ranks(tmp_path)
    del specs["rank 1"]
    with pytest.raises(WorkerFailure,
                       match=r"timed out after \d+ s: rank 0 still running") as info:
        run_processes(WORKER, specs, tmp_path, SHORT_TIMEOUT, WHAT)
    assert "rank 0: joining the group" in str(info.value)
    assert time.monotonic() - start < SHORT_TIMEOUT + 10


# ------------------------------------------------------------- one process, no group

def test_without_a_group_it_is_batchnorm_with_torchs_state_and_checks():
    import torch

    from numbabn.torch import BatchNorm2d, SyncBatchNorm

    sync, plain = SyncBatchNorm(3), BatchNorm2d(3)
    assert sync.state_dict().keys() == torch.nn.SyncBatchNorm(3).state_dict().keys()
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    x = (5.0 + torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
         ).contiguous(memory_format=torch.channels_last)
    y_sync, y_plain = sync(x), plain(x)
    assert torch.equal(y_sync, y_plain)
    assert y_sync.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(sync.running_var, plain.running_var)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.ones(3))
    with pytest.raises(ValueError, match="non-zero"):
        SyncBatchNorm(0)(torch.ones(2, 0))


def test_convert_sync_batchnorm_keeps_the_tensors():
    import torch

    import numbabn.torch as nbt

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
                                torch.nn.Flatten(), nbt.BatchNorm1d(8)).eval()
    weight, running_var = model[1].weight, model[3].running_var
    converted = nbt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert type(model[1]) is type(model[3]) is nbt.SyncBatchNorm
    assert model[1].weight is weight and model[3].running_var is running_var
    assert not model[1].training


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_synchronized_path_takes_half_shares(tmp_path, dtype):
    """The synchronized forward and backward on a half share (here through a group of one
    rank, which the module itself would not synchronize): bfloat16 reaches the stages as
    an ml_dtypes view, as in the plain module, and both match torch's float64 batch norm
    within their rounding."""
    import torch
    import torch.distributed as dist

    import torch_cases as tc
    from numbabn.torch import _bridge, _sync

    dtype = getattr(torch, dtype)
    if dtype == torch.bfloat16 and _bridge._BFLOAT16 is None:
        pytest.skip("ml_dtypes is not installed (bfloat16 goes through float32 then)")
    x = tc.make_x((6, 3, 4, 5), torch.channels_last, dtype, seed=2).requires_grad_(True)
    dy = tc.make_x((6, 3, 4, 5), torch.contiguous_format, dtype, seed=3, loc=0.0, scale=1.0)
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        y, mean, var, _ = _sync._SyncBatchNormFunction.apply(x, weight, bias, 1e-5, None, 1)
        y.backward(dy)
    finally:
        dist.destroy_process_group()
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.batch_norm(x64, None, None, weight, bias, training=True,
                                         eps=1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype and x.grad.dtype == dtype
    tc.assert_close(y, y64, dtype, "y")
    tc.assert_close(x.grad, x64.grad, dtype, "dx")
    tc.assert_close(mean, x64.detach().mean((0, 2, 3)), torch.float64, "mean")
