"""Training parity: DDP and FSDP2 on the backend under test vs the same training on gloo, inside the same processes.

Comparison rule (documented): float64 models. At 2 ranks a gradient all-reduce is a single addition of two
values, which is commutative, so plait and gloo must give *bitwise* equal parameters (torch.equal). At 3+ ranks
the summation order may legitimately differ between algorithms, so parameters are compared with
torch.allclose(rtol=1e-10, atol=1e-12) after 20 steps. float32 runs use rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import _harness as H

STEPS = 20


def _mlp(dtype, bn: bool):
    torch.manual_seed(1234)
    layers = [nn.Linear(16, 32), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm1d(32))  # buffers: exercises DDP's buffer broadcast
    layers += [nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)]
    return nn.Sequential(*layers).to(dtype)


def _batch(rank, step, dtype):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 16, generator=g, dtype=dtype), torch.randn(8, 4, generator=g, dtype=dtype)


def _train_ddp(pg, rank, dtype, ddp_kwargs, bn):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_mlp(dtype, bn), process_group=pg, **ddp_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    losses = []
    for step in range(STEPS):
        x, y = _batch(rank, 0, dtype)  # a fixed batch per rank: the loss must go down
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # parameters then buffers (BatchNorm running stats are per rank after the last local forward)
    return [p.detach().clone() for p in model.module.parameters()] + \
        [b.detach().clone() for b in model.module.buffers()], losses


def worker_ddp(rank, ws, dtype_name, ddp_kwargs, bn):
    dtype = getattr(torch, dtype_name)
    gloo = dist.new_group(backend="gloo")
    p_test, l_test = _train_ddp(dist.group.WORLD, rank, dtype, ddp_kwargs, bn)
    p_gloo, l_gloo = _train_ddp(gloo, rank, dtype, ddp_kwargs, bn)
    # parameters identical on every rank (checked over gloo)
    n_params = len(list(_mlp(dtype, bn).parameters()))
    mine = torch.cat([p.reshape(-1).to(torch.float64) for p in p_test[:n_params]])
    outs = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(outs, mine, group=gloo)
    same_across_ranks = all(torch.equal(o, outs[0]) for o in outs)
    return {"test": p_test, "gloo": p_gloo, "loss_test": l_test, "loss_gloo": l_gloo,
            "same_across_ranks": same_across_ranks}


def _compare(results, exact, rtol, atol):
    for r, res in enumerate(results):
        assert res["same_across_ranks"], f"DDP parameters differ between ranks (seen on rank {r})"
        for i, (a, b) in enumerate(zip(res["test"], res["gloo"])):
            if exact:
                assert torch.equal(a, b), f"rank {r} tensor {i}: max diff {(a - b).abs().max().item()} (expected bitwise)"
            else:
                assert torch.allclose(a, b, rtol=rtol, atol=atol), \
                    f"rank {r} tensor {i}: max diff {(a - b).abs().max().item()}"
        assert res["loss_test"][-1] < res["loss_test"][0], "training did not reduce the loss"


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "ws,dtype,ddp_kwargs,bn",
    [
        (2, "float64", {}, True),
        (3, "float64", {}, True),
        (3, "float64", dict(bucket_cap_mb=0.001, gradient_as_bucket_view=True), False),
        (2, "float32", dict(bucket_cap_mb=0.002), False),
    ],
    ids=["2r-f64-bn", "3r-f64-bn", "3r-f64-tinybuckets", "2r-f32-buckets"],
)
def test_ddp_parity_with_gloo(ws, dtype, ddp_kwargs, bn):
    results = H.run_world(worker_ddp, ws, dtype, ddp_kwargs, bn)
    if dtype == "float64":
        _compare(results, exact=(ws == 2), rtol=1e-10, atol=1e-12)
    else:
        _compare(results, exact=False, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# FSDP2


def _train_fsdp2(pg, rank, ws, dtype, steps, reshard):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(pg, "cpu")
    model = _mlp(dtype, bn=False)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        x, y = _batch(rank, step, dtype)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def worker_fsdp2(rank, ws, steps, reshard):
    gloo = dist.new_group(backend="gloo")
    p_test = _train_fsdp2(dist.group.WORLD, rank, ws, torch.float64, steps, reshard)
    p_gloo = _train_fsdp2(gloo, rank, ws, torch.float64, steps, reshard)
    return {"test": p_test, "gloo": p_gloo}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ws,reshard", [(2, True), (3, False)])
def test_fsdp2_parity_with_gloo(ws, reshard):
    results = H.run_world(worker_fsdp2, ws, 8, reshard)
    for r, res in enumerate(results):
        for i, (a, b) in enumerate(zip(res["test"], res["gloo"])):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), \
                f"rank {r} param {i}: max diff {(a - b).abs().max().item()}"
        for i, (a, b) in enumerate(zip(res["test"], results[0]["test"])):
            assert torch.equal(a, b), f"FSDP2 full parameters differ between rank 0 and rank {r} (param {i})"
