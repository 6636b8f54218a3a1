import sys, time, resource
sys.path.insert(0, "tests")
import torch, torch.distributed as dist
import _harness as H

def worker(rank, ws, n, algo):
    import plait
    g = dist.new_group(backend="plait", pg_options=plait.Options(algo=algo))
    t = torch.full((n,), float(rank + 1))
    dist.all_reduce(t, group=g)
    dist.barrier()
    if rank == ws - 1:
        time.sleep(3)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    dist.all_reduce(t, group=g)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return round((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), 2), round(time.monotonic() - t0, 2)

if __name__ == "__main__":
    for algo in ["ring", "tree", "direct"]:
        for n in [1 << 10, 1 << 20]:
            res = H.run_world(worker, 3, n, algo, env={"PLAIT_TRANSPORT": "tcp"})
            print(algo, n, res, flush=True)
