"""One process of the synchronized-BN test (``tests/test_torch_sync.py``).

Usage::

    python torch_sync_worker.py rank RANK WORLD PORT OUT.npz   # one rank of a gloo group
    python torch_sync_worker.py single OUT.npz                  # no group: whole batches

Every process builds the same model from the same seed: Conv2d -> SyncBatchNorm (4-D,
channels-last input) -> ReLU -> Flatten -> Linear -> SyncBatchNorm (2-D) -> ReLU ->
Linear, and trains it with SGD for ``len(SHARES)`` steps on the same global batches; a
rank takes its share of each step's batch (the shares differ, and one is empty), the
single process the whole batch. The loss is the sum of per-example cross entropies over
the global batch size, and ranks add their parameter gradients (``all_reduce``), so all
compute the single process's gradient. Saves the final parameters and buffers, each
step's BN outputs and input gradients of the rank's examples (in the global batch's
order), and the per-rank example counts.

``SYNC_DIE_AFTER_STEP=k``: the process exits with status 3 after step k (a dead rank).
The group's timeout (``TIMEOUT_S``) only bounds a collective wait without the test's
harness, which kills every rank as soon as one fails or its deadline passes: it is long,
so that a healthy run on a loaded machine (a peer still importing, or compiling its
kernels) never trips it.
"""

import datetime
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from numbabn.torch import SyncBatchNorm  # noqa: E402

#: examples of rank 0 and rank 1 at each step: unequal, one empty, the totals vary
SHARES = [(5, 3), (2, 6), (0, 7), (4, 4)]
CHANNELS, SIZE, CLASSES, HIDDEN = 4, 6, 5, 8
LEARNING_RATE = 0.1
TIMEOUT_S = 600


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, CHANNELS, 3, padding=1), SyncBatchNorm(CHANNELS), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(CHANNELS * SIZE * SIZE, HIDDEN),
        SyncBatchNorm(HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))
    with torch.no_grad():  # non-trivial affine parameters
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
    return model


def batches():
    """The global batches: ``(x, labels)`` per step; x has a large mean (1e3) and is
    channels-last, which a naive E[x^2] - E[x]^2 would not survive."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for share in SHARES:
        n = sum(share)
        x = 1e3 + torch.randn(n, 3, SIZE, SIZE, generator=gen)
        out.append((x.contiguous(memory_format=torch.channels_last),
                    torch.randint(0, CLASSES, (n,), generator=gen)))
    return out


def train(rank=None, world=1):
    model = build()
    record = {"examples": []}
    die_after = int(os.environ.get("SYNC_DIE_AFTER_STEP", "-1"))
    outputs = {}
    model[1].register_forward_hook(lambda m, i, o: outputs.__setitem__("bn1", o))
    model[5].register_forward_hook(lambda m, i, o: outputs.__setitem__("bn2", o))
    for step, ((x, y), share) in enumerate(zip(batches(), SHARES)):
        if rank is not None:
            start = sum(share[:rank])
            x, y = x[start:start + share[rank]], y[start:start + share[rank]]
        x = x.detach().requires_grad_(True)
        record["examples"].append(len(y))
        outputs.clear()
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") / sum(share)
        loss.backward()
        if rank is not None:
            for p in model.parameters():
                dist.all_reduce(p.grad)  # two ranks: a + b, the same bits on both
        with torch.no_grad():  # SGD by hand: torch.optim imports torch._dynamo (~5 s)
            for p in model.parameters():
                p -= LEARNING_RATE * p.grad
                p.grad = None
        record[f"step{step}_bn1"] = outputs["bn1"].detach().numpy()
        record[f"step{step}_bn2"] = outputs["bn2"].detach().numpy()
        record[f"step{step}_dx"] = x.grad.numpy()
        print(f"rank {rank}: step {step} done, {len(y)} examples", flush=True)
        if step == die_after:
            print(f"rank {rank}: dying on purpose after step {step}", flush=True)
            os._exit(3)
    for name, t in model.state_dict().items():
        record[f"state.{name}"] = t.numpy()
    return record


def main():
    torch.set_num_threads(1)  # two processes share the test machine's cores
    mode = sys.argv[1]
    if mode == "rank":
        rank, world, port, path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        print(f"rank {rank}: joining the group", flush=True)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        record = train(rank, world)
        dist.destroy_process_group()
    else:
        path = sys.argv[2]
        record = train()
    np.savez(path, **record)


if __name__ == "__main__":
    main()
