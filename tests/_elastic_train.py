"""A small DDP training job for the elastic-restart test (tests/test_elastic.py), run by torchrun:

    torchrun --max-restarts=1 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \
        tests/_elastic_train.py --out DIR --steps 12 --ckpt-every 3 [--kill-rank 2 --kill-step 7]

Backend "plait"; gradients go through plait.hooks.compressed_allreduce_hook (int8 with error feedback, compressing
from the first step). Every ``--ckpt-every`` steps each rank writes its checkpoint (model, optimizer, the hook's
state with its residuals, the step) to DIR/ckpt/step-N/rank-R.pt (temporary file + os.replace); after a barrier rank
0 points DIR/ckpt/latest at step N (again by os.replace), so ``latest`` only ever names a complete checkpoint. At
start every rank loads ``latest`` if there is one. On the first attempt (TORCHELASTIC_RESTART_COUNT=0) rank
``--kill-rank`` SIGKILLs itself at the start of step ``--kill-step`` after writing the time to DIR/kill_time; after
the restart every rank writes when its process started, when the group was ready, when the checkpoint was loaded and
when its first step ended to DIR/first_step_after_restart.R (JSON). At the end each rank
saves its final parameters to DIR/final-R.pt and a summary (attempt, resumed-from step, steps run) to DIR/done-R.json.

DDP runs with find_unused_parameters=True: then DDP's bucket layout is the same from the first step on (with the
default, DDP starts with one bucket and rebuilds its buckets after the first step, so the first step after a restart
would quantize different blocks than the uninterrupted run did at that step; see the test's docstring).
"""

import time

_T_START = time.time()  # before torch is imported: the restarted worker's start

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import plait


def _model():
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 8))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000003 * step + 101 * rank + 7)
    x = torch.randn(16, 32, generator=g)
    y = torch.randint(0, 8, (16,), generator=g)
    return x, y


def _atomic_save(obj, path):
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--default-ddp", action="store_true",
                    help="DDP's default bucketing (one bucket at first, rebuilt after the first step)")
    ap.add_argument("--no-hook-state", action="store_true",
                    help="resume without the hook's residuals (a control: the result then differs)")
    a = ap.parse_args()

    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    t_imported = time.time()
    dist.init_process_group("plait")
    t_init = time.time()
    rank, ws = dist.get_rank(), dist.get_world_size()
    ckdir = os.path.join(a.out, "ckpt")
    os.makedirs(ckdir, exist_ok=True)

    model = _model()
    ddp = DDP(model, find_unused_parameters=not a.default_ddp, bucket_cap_mb=0.01)  # several buckets
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    state = plait.hooks.CompressionState(compression=a.codec, error_feedback=True, start_iter=0, min_bytes=0)
    ddp.register_comm_hook(state, plait.hooks.compressed_allreduce_hook)

    start = 0
    latest = os.path.join(ckdir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            start = int(f.read())
        ck = torch.load(os.path.join(ckdir, f"step-{start}", f"rank-{rank}.pt"), weights_only=False)
        assert ck["step"] == start and ck["rank"] == rank and ck["world"] == ws, (ck["step"], ck["rank"], start)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        if not a.no_hook_state:
            state.load_state_dict(ck["hook"])
        else:
            state.iter = ck["hook"]["iter"]
    t_loaded = time.time()

    first_after_restart = attempt > 0
    for step in range(start, a.steps):
        if attempt == 0 and rank == a.kill_rank and step == a.kill_step:
            with open(os.path.join(a.out, "kill_time"), "w") as f:
                f.write(repr(time.time()))
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = _batch(rank, step)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first_after_restart:
            # when the first step after the restart ended, and where the time went (wall clock, seconds since epoch)
            with open(os.path.join(a.out, f"first_step_after_restart.{rank}"), "w") as f:
                json.dump({"process_start": _T_START, "torch_imported": t_imported, "group_ready": t_init,
                           "checkpoint_loaded": t_loaded, "first_step_done": time.time()}, f)
            first_after_restart = False
        done = step + 1
        if done % a.ckpt_every == 0 and done < a.steps:
            d = os.path.join(ckdir, f"step-{done}")
            os.makedirs(d, exist_ok=True)
            _atomic_save({"step": done, "rank": rank, "world": ws, "model": model.state_dict(),
                          "optim": opt.state_dict(), "hook": state.state_dict()}, os.path.join(d, f"rank-{rank}.pt"))
            dist.barrier()  # every rank's file is in place before `latest` names the step
            if rank == 0:
                tmp = latest + ".tmp"
                with open(tmp, "w") as f:
                    f.write(str(done))
                os.replace(tmp, latest)
            dist.barrier()

    _atomic_save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(a.out, f"final-{rank}.pt"))
    with open(os.path.join(a.out, f"done-{rank}.json"), "w") as f:
        json.dump({"attempt": attempt, "resumed_from": start, "steps": a.steps, "hook_iter": state.iter,
                   "residual_params": len(state.state_dict()["residuals"])}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
