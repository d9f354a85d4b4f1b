"""DistributedDataParallel on the CPU (gloo, two processes): a training step of an rnnkernels.LSTM whose
averaged gradients equal those of one process on the concatenated batch."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                                    reason="torch.distributed with gloo needed")]

WORLD = 2


def build(backend):
    import rnnkernels

    torch.manual_seed(0)
    return rnnkernels.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True, backend=backend).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * WORLD, 6, 3, dtype=torch.float64, generator=g)
    target = torch.randn(2 * WORLD, 6, 10, dtype=torch.float64, generator=g)
    return x, target


def loss_fn(model, x, target):
    out, (h, c) = model(x)
    return ((out - target) ** 2).mean() + h.pow(2).mean()


def worker(rank, port, path, root, backend):
    sys.path.insert(0, root)  # the spawned interpreter imports rnnkernels as the parent did
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(build(backend))
        x, target = data()
        shard = slice(rank * 2, rank * 2 + 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn(model, x[shard], target[shard]).backward()
        grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
        optimizer.step()
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "params": params}, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["cpu"])
def test_ddp_gradients_match_single_process(backend, tmp_path):
    import rnnkernels

    root = os.path.dirname(os.path.dirname(os.path.abspath(rnnkernels.__file__)))
    path = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), path, root, backend), nprocs=WORLD, join=True)
    result = torch.load(path)

    model = build(backend)
    x, target = data()
    # DDP averages the per-process gradients of per-shard means = the gradient of the mean over shards
    loss = sum(loss_fn(model, x[r * 2: r * 2 + 2], target[r * 2: r * 2 + 2]) for r in range(WORLD)) / WORLD
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert sorted(result["grads"]) == sorted(names)
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0
        torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-12, rtol=1e-10, msg=name)
        torch.testing.assert_close(result["params"][name], p.detach() - 0.5 * p.grad, atol=1e-12, rtol=1e-10, msg=name)
    # and the concatenated batch in one call gives the same gradient for a per-sequence-mean loss
    model.zero_grad()
    out, (h, c) = model(x)
    full = ((out - target) ** 2).mean() + sum(h[:, r * 2: r * 2 + 2].pow(2).mean() for r in range(WORLD)) / WORLD
    full.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, atol=1e-12, rtol=1e-10, msg=name)
