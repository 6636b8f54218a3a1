"""plait's flight recorder: read the records every rank wrote and say who entered which collective and who is missing.

Every plait process group keeps its last ``PLAIT_TRACE_BUFFER`` (default 2048) collectives and point-to-point
transfers. On a failure or timeout each rank writes them as JSON to ``PLAIT_TRACE_DIR``
(``plait-trace.<group id>.<rank>.json``) and asks the group's other ranks, through the store, to write theirs (a rank
that is alive but never entered the collective writes its record too, within about a second).
``plait.trace_dump()`` writes them on demand. Then::

    python -m plait.trace DIR            # the verdict per group: who entered the last collectives, who is missing
    python -m plait.trace DIR --json     # the same as JSON
    python -m plait.trace DIR --entries 20   # and each rank's last 20 entries

The first question of every hang, "which rank did not call?", is the first line of the verdict.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

__all__ = ["load", "analyze", "format_report", "main"]


def load(directory: str) -> list[dict]:
    """Every flight record (``plait-trace.*.json``) in ``directory``; unreadable files raise naming the file."""
    records = []
    bad = []
    for path in sorted(glob.glob(os.path.join(directory, "plait-trace.*.json"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                rec = json.load(f)
            if not isinstance(rec, dict) or rec.get("format") != "plait-trace-1":
                raise ValueError("not a plait flight record")
        except (OSError, ValueError) as e:
            # One torn or foreign file must not hide every other rank's record.
            print(f"plait.trace: skipping {path}: cannot read the flight record: {e}", file=sys.stderr)
            bad.append(path)
            continue
        rec["_path"] = path
        # plait-trace.<group>.<rank>.failure.json: written at a failure after the rank had answered a peer's request
        rec["_failure"] = path.endswith(".failure.json")
        records.append(rec)
    if bad and not records:
        raise ValueError(f"plait.trace: none of the flight records in {directory} can be read ({len(bad)} skipped)")
    return records


def _describe(e: dict) -> str:
    if e["op"] in ("send", "recv"):
        peer = "any source" if e.get("peer", -1) < 0 else f"rank {e['peer']}"
        return f"{e['op']} {'to' if e['op'] == 'send' else 'from'} {peer} (tag {e.get('tag')}, {e['bytes']} bytes)"
    s = f"{e['op']} seq {e['seq']} ({e['dtype']} x {e['count']}"
    if e["op"] in ("broadcast", "reduce", "gather", "scatter"):
        s += f", root {e['root']}"
    if e.get("algorithm"):
        s += f", {e['algorithm']}"
    if e.get("device"):
        s += ", device"
    return s + ")"


def _signature(e: dict):
    """What every rank must agree on for one collective."""
    return (e["op"], e["dtype"], e["count"], e.get("root") if e["op"] in ("broadcast", "reduce", "gather", "scatter")
            else None, e.get("reduce_op") if e["op"] in ("all_reduce", "reduce", "reduce_scatter") else None)


def analyze(records: list[dict]) -> list[dict]:
    """One verdict per group (dicts; see ``format_report`` for the words)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group_id"], []).append(r)
    out = []
    for gid, recs in sorted(groups.items(), key=lambda kv: kv[0]):
        size = max(r["size"] for r in recs)
        by_rank: dict[int, dict] = {}
        late: dict[int, dict] = {}
        for r in recs:
            if r.get("_failure"):
                late[r["rank"]] = r  # it answered a request first: that record says where it was
                continue
            if r["rank"] not in by_rank or r["dumped_at_us"] > by_rank[r["rank"]]["dumped_at_us"]:
                by_rank[r["rank"]] = r
        for rank, r in late.items():
            by_rank.setdefault(rank, r)
        colls = {rank: [e for e in r["entries"] if e["op"] not in ("send", "recv")] for rank, r in by_rank.items()}
        last = {rank: (es[-1] if es else None) for rank, es in colls.items()}
        last_seq = {rank: (e["seq"] if e else 0) for rank, e in last.items()}
        frontier = max(last_seq.values()) if last_seq else 0
        # The oldest collective some rank has not finished: where the group stopped.
        stuck = None
        for rank, es in colls.items():
            for e in es:
                if e["state"] not in ("completed", "enqueued") and (stuck is None or e["seq"] < stuck):
                    stuck = e["seq"]
        seq = stuck if stuck is not None else frontier
        entered, sigs = {}, {}
        for rank, es in colls.items():
            for e in es:
                if e["seq"] == seq:
                    entered[rank] = e
                    sigs.setdefault(_signature(e), []).append(rank)
        oldest = {rank: (es[0]["seq"] if es else None) for rank, es in colls.items()}
        missing, unknown, wrapped = [], [], []
        any_coll = any(es for es in colls.values())
        for rank in range(size):
            if rank in entered or not any_coll:
                continue
            if rank not in by_rank:
                unknown.append(rank)  # no record: dead, or never asked
            elif oldest[rank] is not None and oldest[rank] > seq:
                wrapped.append(rank)  # its buffer no longer reaches back that far
            else:
                missing.append(rank)
        pending_p2p = []
        for rank, r in by_rank.items():
            for e in r["entries"]:
                if e["op"] in ("send", "recv") and e["state"] != "completed":
                    pending_p2p.append({"rank": rank, "entry": e})
        verdict = {
            "group_id": gid,
            "group": recs[0].get("group", ""),
            "size": size,
            "ranks_with_records": sorted(by_rank),
            "seq": seq,
            "collective": _describe(next(iter(entered.values()))) if entered else None,
            "entered": sorted(entered),
            "states": {rank: e["state"] for rank, e in sorted(entered.items())},
            "errors": {rank: e["error"] for rank, e in sorted(entered.items()) if e.get("error")},
            "missing": missing,
            "no_record": unknown,
            "wrapped": wrapped,
            "late": {rank: r.get("reason", "") for rank, r in sorted(late.items())},
            "where": {rank: (f"global rank {r['global_rank']}, " if "global_rank" in r else "") +
                      f"{r.get('host', '')}, pid {r.get('pid')}" for rank, r in sorted(by_rank.items())},
            "global_ranks": next((r["global_ranks"] for r in recs if r.get("global_ranks")), []),
            "last_entered": {rank: (_describe(e) + f" {e['state']}" if e else "nothing") for rank, e in
                             sorted(last.items())},
            "disagree": ({", ".join(map(str, ranks)): _describe(entered[ranks[0]]) for sig, ranks in sigs.items()}
                         if len(sigs) > 1 else {}),
            "pending_p2p": [{"rank": p["rank"], "what": _describe(p["entry"]), "state": p["entry"]["state"]}
                            for p in pending_p2p],
            "reasons": {rank: r.get("reason", "") for rank, r in sorted(by_rank.items())},
        }
        out.append(verdict)
    return out


def format_report(verdicts: list[dict], records: list[dict] | None = None, entries: int = 0) -> str:
    lines = []
    for v in verdicts:
        name = v["group"] or "default group"
        gr = f", global ranks {v['global_ranks']}" if v.get("global_ranks") else ""
        lines.append(f"group '{name}' (id {v['group_id']}, {v['size']} ranks{gr}; ranks below are the group's; "
                     f"records from {_ranks(v['ranks_with_records'])})")
        if v["collective"] is None:
            lines.append("  no collective recorded")
        else:
            head = f"  {v['collective']}: entered by {_ranks(v['entered'])}"
            if v["missing"]:
                head += f"; MISSING: {_ranks(v['missing'])} (never entered it)"
            if v["no_record"]:
                head += f"; no record from {_ranks(v['no_record'])} (dead, or its record was not written)"
            if v["wrapped"]:
                head += f"; {_ranks(v['wrapped'])}: record no longer reaches back to it (PLAIT_TRACE_BUFFER)"
            if not v["missing"] and not v["no_record"] and not v["wrapped"]:
                head += " (every rank)"
            lines.append(head)
            for ranks, what in v["disagree"].items():
                lines.append(f"  DISAGREE: ranks {ranks} called {what}")
            for rank, st in v["states"].items():
                err = v["errors"].get(rank)
                lines.append(f"    rank {rank}: {st}" + (f": {err}" if err else ""))
        for rank in v["missing"]:
            lines.append(f"    rank {rank} ({v['where'][rank]}) last entered: {v['last_entered'][rank]}")
        for rank, why in v["late"].items():
            lines.append(f"    rank {rank} failed later (after answering the request): {why}")
        for p in v["pending_p2p"]:
            lines.append(f"    rank {p['rank']}: {p['what']} {p['state']}")
        if records and entries:
            for r in records:
                if r["group_id"] != v["group_id"]:
                    continue
                lines.append(f"  rank {r['rank']} ({r.get('host', '')}, pid {r.get('pid')}), last {entries} of "
                             f"{r['recorded']} entries; written because: {r.get('reason', '')}")
                for e in r["entries"][-entries:]:
                    dur = e.get("duration_us", e.get("running_for_us"))
                    lines.append(f"    {_describe(e)}: {e['state']}, {dur} us" +
                                 (f", waited on {e['waited_on']}" if e.get("waited_on") else ""))
    return "\n".join(lines)


def _ranks(rs) -> str:
    rs = list(rs)
    if not rs:
        return "no rank"
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plait.trace", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="the PLAIT_TRACE_DIR the ranks wrote to (or plait.trace_dump's directory)")
    ap.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    ap.add_argument("--entries", type=int, default=0, help="also print each rank's last N entries")
    a = ap.parse_args(argv)
    try:
        records = load(a.dir)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if not records:
        print(f"plait.trace: no flight records (plait-trace.*.json) in {a.dir}", file=sys.stderr)
        return 1
    verdicts = analyze(records)
    if a.json:
        print(json.dumps(verdicts, indent=1, default=str))
    else:
        print(format_report(verdicts, records, a.entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
