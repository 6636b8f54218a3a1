"""Elastic restart and group-lifecycle measurements (the figures behind tests/test_elastic.py and
tests/test_lifecycle.py).

    python bench/elastic.py restart [--rounds 3]     torchrun --max-restarts=1, 4 ranks, rank 2 SIGKILLed at step 7:
                                                     restarts, time to recover (with its breakdown), final weights
                                                     bitwise equal to an uninterrupted run; plus two controls that
                                                     must differ: resuming without the hook's residuals, and DDP's
                                                     default bucketing (--no-controls skips them)
    python bench/elastic.py groups [--groups 2000]   groups created, used and destroyed in one process (4 ranks):
                                                     leak counts, ms per group, RSS and store keys per group

Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.insert(0, TESTS)


def _equal(a_dir, b_dir, world):
    import torch

    worst = 0.0
    for r in range(world):
        a = torch.load(os.path.join(a_dir, f"final-{r}.pt"))
        b = torch.load(os.path.join(b_dir, f"final-{r}.pt"))
        for k in a:
            worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst == 0.0, worst


def restart(args):
    import test_elastic as E

    W = E.WORLD
    for rnd in range(args.rounds):
        base = tempfile.mkdtemp(prefix="plait_elastic_")
        ref, run = os.path.join(base, "ref"), os.path.join(base, "run")
        rc, log = E.torchrun(ref)
        assert rc == 0, log[-4000:]
        rc, log = E.torchrun(run, "--kill-rank", E.KILL_RANK, "--kill-step", E.KILL_STEP)
        assert rc == 0, log[-4000:]
        restarts = sum("failed (exitcode: -9)" in ln for ln in log.splitlines())
        with open(os.path.join(run, "kill_time")) as f:
            t_kill = float(f.read())
        firsts = [json.load(open(p)) for p in glob.glob(os.path.join(run, "first_step_after_restart.*"))]
        equal, worst = _equal(ref, run, W)
        out = dict(round=rnd, restarts=restarts, bitwise_equal=equal, max_abs_diff=worst,
                   recover_s=round(max(f["first_step_done"] for f in firsts) - t_kill, 3),
                   workers_started_s=round(min(f["process_start"] for f in firsts) - t_kill, 3),
                   torch_imported_s=round(max(f["torch_imported"] for f in firsts) - t_kill, 3),
                   group_ready_s=round(max(f["group_ready"] for f in firsts) - t_kill, 3),
                   checkpoint_loaded_s=round(max(f["checkpoint_loaded"] for f in firsts) - t_kill, 3),
                   load=os.getloadavg()[0])
        if not args.no_controls and rnd == 0:
            # Controls: each must differ from the uninterrupted run, or the equality above proves nothing.
            ctl = os.path.join(base, "no_hook_state")
            rc, log = E.torchrun(ctl, "--kill-rank", E.KILL_RANK, "--kill-step", E.KILL_STEP, "--no-hook-state")
            assert rc == 0, log[-4000:]
            out["control_without_residuals"] = dict(zip(("bitwise_equal", "max_abs_diff"), _equal(ref, ctl, W)))
            ref_d, ctl_d = os.path.join(base, "ref_default"), os.path.join(base, "default_ddp")
            rc, log = E.torchrun(ref_d, "--default-ddp")
            assert rc == 0, log[-4000:]
            rc, log = E.torchrun(ctl_d, "--kill-rank", E.KILL_RANK, "--kill-step", E.KILL_STEP, "--default-ddp")
            assert rc == 0, log[-4000:]
            out["control_default_ddp_buckets"] = dict(zip(("bitwise_equal", "max_abs_diff"), _equal(ref_d, ctl_d, W)))
        print(json.dumps(out), flush=True)


def groups(args):
    import _harness as H
    import test_lifecycle as L

    res = H.run_world(L.worker_many_groups, 4, args.groups, 12, init="tcp", timeout_s=3600)
    print(json.dumps(dict(groups=args.groups, ranks=4, per_group_ms=round(res[0]["per_group_ms"], 2),
                          leaks=[r["leaks"] for r in res], rss_growth_kib=[r["rss_growth_kib"] for r in res],
                          store_keys_per_group=res[0]["store_keys_per_group"],
                          before=res[0]["before"], after=res[0]["after"])), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("restart")
    a.add_argument("--rounds", type=int, default=3)
    a.add_argument("--no-controls", action="store_true")
    b = sub.add_parser("groups")
    b.add_argument("--groups", type=int, default=2000)
    args = ap.parse_args()
    {"restart": restart, "groups": groups}[args.what](args)


if __name__ == "__main__":
    main()
