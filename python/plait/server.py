"""plait-server: a summation server for plait process groups (README "Summation servers").

Start one on each spare CPU host with the job's rendezvous endpoint (the HOST:PORT torchrun's workers use)::

    plait-server HOST:PORT            # or: python -m plait.server HOST:PORT

and set ``PLAIT_SERVERS=k`` (or ``plait.Options(servers=k)``) on the workers. The server registers its address in
the job's store, authenticates every connection with the job's secret, sums the share of each all-reduce the
workers send it (in a fixed worker order, so every worker receives the same bits) and keeps no model state. It runs
until told to stop (SIGINT / SIGTERM, or ``plait-server --stop HOST:PORT``, which stops every server of that store)
or until the job's store has been gone for ``--store-grace`` seconds (the job ended).
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import socket
import sys
import threading
import time

_STOP_KEY = "plait/servers/stop"  # csrc/plait/server/protocol.h kStopKey


def _parse_endpoint(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


def _connect(host: str, port: int, timeout_s: float):
    import torch.distributed as dist

    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            # Wait for the port to accept before handing over to TCPStore: its own retries back off for tens of
            # seconds, which a server started just before the job would spend idle.
            with socket.create_connection((host, port), timeout=2.0):
                pass
            return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                 timeout=datetime.timedelta(seconds=30))
        except Exception as e:  # noqa: BLE001 (not up yet: retry until the deadline)
            last = e
        if time.monotonic() >= deadline:
            raise RuntimeError(f"plait-server: cannot reach the job's store at {host}:{port} within {timeout_s:.0f} s: "
                               f"{last}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="plait-server", description=__doc__.split("\n\n")[0])
    ap.add_argument("endpoint", type=_parse_endpoint, help="the job's rendezvous store, HOST:PORT")
    ap.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    ap.add_argument("--advertise", default="", help="address workers dial (default: the one that routes to HOST)")
    ap.add_argument("--threads", type=int, default=0, help="summation threads per job (default: cores, at most 8)")
    ap.add_argument("--depth", type=int, default=4, help="segments buffered per worker (default 4)")
    ap.add_argument("--connect-timeout", type=float, default=600.0,
                    help="seconds to wait for the job's store to come up (default 600)")
    ap.add_argument("--store-grace", type=float, default=10.0,
                    help="exit once the store has been unreachable this long: the job ended (default 10)")
    ap.add_argument("--stop", action="store_true", help="tell every server of this store to stop, and exit")
    ap.add_argument("--auth-key-file", default=None,
                    help="the job's PLAIT_AUTH_KEY_FILE (default: that variable): workers that use a key file are "
                         "served only by servers holding the same key")
    ap.add_argument("--stats", default="", help="write the server's counters (JSON) to this file when it stops")
    args = ap.parse_args(argv)
    host, port = args.endpoint

    if args.auth_key_file is not None:
        import os

        os.environ["PLAIT_AUTH_KEY_FILE"] = args.auth_key_file  # read by the native core at its first use
    from . import _C  # noqa: F401 (imports torch)

    try:
        key_fp = _C._auth_key_fingerprint()  # raises naming PLAIT_AUTH_KEY_FILE if it cannot be used
    except RuntimeError as e:
        print(f"plait-server: {e}", file=sys.stderr, flush=True)
        return 2

    if args.stop:
        _connect(host, port, args.connect_timeout).add(_STOP_KEY, 1)
        print(f"plait-server: told the servers of {host}:{port} to stop", flush=True)
        return 0
    if args.depth < 1 or args.threads < 0 or not 0 <= args.port < 65536:
        ap.error("--depth must be >= 1, --threads >= 0, --port in [0, 65535]")

    store = _connect(host, port, args.connect_timeout)  # the server's (accept thread's) connection
    control = _connect(host, port, args.connect_timeout)  # this loop's own connection
    stop_seen = control.add(_STOP_KEY, 0)
    srv = _C.SumServer(store, port=args.port, advertise=args.advertise, store_host=host, threads=args.threads,
                       depth=args.depth)
    index = srv.register()
    srv.start()
    if key_fp != "none":
        print(f"plait-server: PLAIT_AUTH_KEY_FILE in use (key fingerprint {key_fp})", flush=True)
    print(f"plait-server: serving the job at {host}:{port} on {srv.address} (registry entry {index})", flush=True)

    done = threading.Event()
    why = ["stopped"]

    def on_signal(signum, _frame):
        why[0] = f"signal {signal.Signals(signum).name}"
        done.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    unreachable_since = None
    while not done.wait(0.5):
        try:
            if control.add(_STOP_KEY, 0) > stop_seen:
                why[0] = "told to stop (plait-server --stop)"
                break
            unreachable_since = None
        except Exception:  # noqa: BLE001 (the store's host went away: the job has ended)
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since >= args.store_grace:
                why[0] = f"the job's store at {host}:{port} is gone (the job ended)"
                break
    try:
        srv.deregister()
    except Exception:  # noqa: BLE001 (the store may be gone)
        pass
    srv.stop()
    st = srv.stats()
    print(f"plait-server: {srv.address} stopping: {why[0]}; {json.dumps(st)}", flush=True)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(st, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
