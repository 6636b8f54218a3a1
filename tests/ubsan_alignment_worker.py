"""The rank program of scripts/ubsan_alignment.sh (not a pytest file): odd-length point-to-point messages, then
float64 all-reduces over the same shared-memory ring, exact results asserted."""

import torch
import torch.distributed as dist


def worker(rank, ws):
    for i in range(3):
        if rank == 0:
            dist.send(torch.arange(3 + i, dtype=torch.uint8), 1)
        else:
            got = torch.empty(3 + i, dtype=torch.uint8)
            dist.recv(got, 0)
            assert torch.equal(got, torch.arange(3 + i, dtype=torch.uint8))
        t = torch.arange(1001, dtype=torch.float64) * (rank + 1)
        dist.all_reduce(t)
        assert torch.equal(t, torch.arange(1001, dtype=torch.float64) * 3)
    return "ok"
