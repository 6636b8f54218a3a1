"""PLAIT_AUTH_KEY_FILE: the TCP secret derived from an operator's key, so that reading the store is not enough.

Without a key file the secret that authenticates TCP connections is the one rank 0 writes into the rendezvous store
(tests/test_multihost.py: a client holding it passes). With one, the secret is HMAC-SHA256(key, "plait auth key v1"
NUL store secret): a client that read the store (secret, job id, addresses) is refused, ranks whose keys differ raise
at rendezvous naming the knob, and a bad key file raises naming the file.
"""

import datetime
import hashlib
import hmac
import os
import socket
import threading

import pytest
import torch
import torch.distributed as dist

import _harness as H
from test_multihost import CHALLENGE, HELLO, HELLO_MAGIC, _find, _host_env, _recv_exact

pytestmark = pytest.mark.skipif(not H.IS_PLAIT, reason="plait's TCP authentication")


def _key(tmp_path, name="key", data=None, mode=0o600):
    p = tmp_path / name
    p.write_bytes(data if data is not None else os.urandom(32).hex().encode() + b"\n")
    os.chmod(p, mode)
    return str(p)


def store_reader_attack(store, report, key: bytes, last_rank=2):
    """A client that read everything in the store: it proves itself with the store's secret."""
    info_key = _find(store, "plait/0/info/0")
    base = info_key[: -len("info/0")]
    _find(store, f"plait/0/info/{last_rank}")
    host, port = store.get(info_key).decode().split("\n")[3].rsplit(":", 1)
    secret = bytes.fromhex(store.get(base + "secret").decode())
    job = (base[base.index("plait/"):] + store.get(base + "uuid").decode()).encode()
    derived = hmac.new(key, b"plait auth key v1\0" + secret, hashlib.sha256).digest()
    s = socket.create_connection((host, int(port)), timeout=20)
    s.settimeout(20)
    hello = HELLO.pack(HELLO_MAGIC, 1, 0, last_rank, 0, os.urandom(16))
    s.sendall(hello)
    _, _, nonce, listener_mac = CHALLENGE.unpack(_recv_exact(s, CHALLENGE.size))
    # The listener's proof is made with the derived secret, not the store's.
    report["listener_proof_with_store_secret"] = hmac.compare_digest(
        listener_mac, hmac.new(secret, b"L" + job + hello + nonce, hashlib.sha256).digest())
    report["listener_proof_with_derived_secret"] = hmac.compare_digest(
        listener_mac, hmac.new(derived, b"L" + job + hello + nonce, hashlib.sha256).digest())
    s.sendall(hmac.new(secret, b"D" + job + hello + nonce, hashlib.sha256).digest())
    try:
        data = s.recv(4)
        report["store_secret"] = "accepted" if data == (0x504C544B).to_bytes(4, "little") else "refused"
    except (ConnectionResetError, socket.timeout):
        report["store_secret"] = "refused"
    s.close()


def worker_attack(rank, ws, port, key_path):
    import plait

    store = dist.TCPStore("127.0.0.1", port, ws, rank == 0, timeout=datetime.timedelta(seconds=60))
    report, th = {}, None
    if rank == ws - 1:
        with open(key_path, "rb") as f:
            key = f.read().rstrip(b"\r\n\t ")
        th = threading.Thread(target=store_reader_attack, args=(store, report, key))
        th.start()
    dist.init_process_group("plait", store=store, rank=rank, world_size=ws, timeout=datetime.timedelta(seconds=60))
    if th is not None:
        th.join(timeout=60)
        assert not th.is_alive(), "the store-reading client hung"
    t = torch.arange(1003, dtype=torch.int64) * (rank + 1)
    dist.all_reduce(t)
    ok = torch.equal(t, torch.arange(1003, dtype=torch.int64) * sum(range(1, ws + 1)))
    fp = plait._C._auth_key_fingerprint()
    dist.destroy_process_group()
    return ok, report, fp


def test_a_client_that_read_the_store_is_refused(tmp_path):
    key = _key(tmp_path)
    port = H.free_port()
    rank_env = _host_env((0, 1, 2))
    rank_env[2]["PLAIT_TEST_DIAL_DELAY_MS"] = "3000"
    res = H.run_world(worker_attack, 3, port, key, init=None, rank_env=rank_env, expect_fail=True,
                      env={"PLAIT_AUTH_KEY_FILE": key})
    assert all(r.ok for r in res), "\n".join(f"{r.describe()}\n{r.tb}\n{r.log[-3000:]}" for r in res)
    assert all(r.value[0] for r in res), "all_reduce result changed"
    report = res[-1].value[1]
    assert report == {"listener_proof_with_store_secret": False, "listener_proof_with_derived_secret": True,
                      "store_secret": "refused"}, report
    fps = {r.value[2] for r in res}
    assert len(fps) == 1 and fps != {"none"} and len(fps.pop()) == 16
    assert "refused a TCP connection" in res[0].log


def worker_tcp(rank, ws):
    t = torch.arange(10, dtype=torch.int32) + rank
    dist.all_reduce(t)
    return t.tolist()


def test_ranks_with_different_keys_raise_at_rendezvous(tmp_path):
    k1, k2 = _key(tmp_path, "k1"), _key(tmp_path, "k2")
    res = H.run_world(worker_tcp, 2, env={"PLAIT_TRANSPORT": "tcp"}, rank_env={0: {"PLAIT_AUTH_KEY_FILE": k1},
                      1: {"PLAIT_AUTH_KEY_FILE": k2}}, expect_fail=True, pg_timeout_s=20)
    assert all(not r.ok for r in res)
    assert all("ranks disagree on PLAIT_AUTH_KEY_FILE (key fingerprint)" in (r.exc_msg or "") for r in res), res[0].exc_msg


def test_a_rank_without_the_key_raises_at_rendezvous(tmp_path):
    k1 = _key(tmp_path, "k1")
    res = H.run_world(worker_tcp, 2, env={"PLAIT_TRANSPORT": "tcp"}, rank_env={0: {"PLAIT_AUTH_KEY_FILE": k1}},
                      expect_fail=True, pg_timeout_s=20)
    assert all(not r.ok for r in res)
    assert any("has none" in (r.exc_msg or "") or "none, rank" in (r.exc_msg or "") for r in res), [(r.exc_msg or "") for r in res]


def test_the_same_key_everywhere_works_over_tcp(tmp_path):
    k = _key(tmp_path)
    res = H.run_world(worker_tcp, 3, env={"PLAIT_TRANSPORT": "tcp", "PLAIT_AUTH_KEY_FILE": k})
    assert res == [[3 + 3 * i for i in range(10)]] * 3


@pytest.mark.parametrize("case", ["missing", "short", "directory"])
def test_a_bad_key_file_raises_naming_it(tmp_path, case):
    if case == "missing":
        path = str(tmp_path / "nope")
        want = "cannot be read"
    elif case == "short":
        path = _key(tmp_path, data=b"tooshort\n")
        want = "holds 8 bytes; a key needs at least 16"
    else:
        path = str(tmp_path)
        want = "is not a regular file"
    res = H.run_world(worker_tcp, 2, env={"PLAIT_TRANSPORT": "tcp", "PLAIT_AUTH_KEY_FILE": path}, expect_fail=True,
                      pg_timeout_s=20)
    assert all(not r.ok for r in res)
    assert any(f"PLAIT_AUTH_KEY_FILE={path}" in (r.exc_msg or "") and want in (r.exc_msg or "") for r in res), [(r.exc_msg or "") for r in res]


def test_a_readable_key_file_is_warned_about(tmp_path):
    k = _key(tmp_path, mode=0o644)
    res = H.run_world(worker_tcp, 2, env={"PLAIT_TRANSPORT": "tcp", "PLAIT_AUTH_KEY_FILE": k}, expect_fail=True)
    assert all(r.ok for r in res)
    assert "can be read by other users (mode 644); chmod 600 it" in res[0].log


def w_servers(rank, world):
    t = torch.arange(5000, dtype=torch.int32) * (rank + 1)
    dist.all_reduce(t)
    import plait

    assert plait.topology()["servers"]["server_bytes"] > 0
    return torch.equal(t, torch.arange(5000, dtype=torch.int32) * sum(range(1, world + 1)))


def test_summation_servers_need_the_key_too(tmp_path):
    from test_servers import fake_hosts, servers

    key = _key(tmp_path)
    env = {"PLAIT_SERVERS": "1", "PLAIT_SERVER_SHARE": "1", "PLAIT_SERVER_GBPS": "10", "PLAIT_AUTH_KEY_FILE": key}
    port = H.free_port()
    with servers(port, 1, tmp_path, args=("--auth-key-file", key)):
        res = H.run_world(w_servers, 3, init="tcp", port=port, env=env, rank_env=fake_hosts(3), timeout_s=120)
    assert res == [True] * 3
    # A server without the key cannot prove it holds the job's secret: the workers refuse it, naming why.
    port = H.free_port()
    with servers(port, 1, tmp_path, env={"PLAIT_AUTH_KEY_FILE": ""}) as (_, logs):
        res = H.run_world(w_servers, 3, init="tcp", port=port, env=env, rank_env=fake_hosts(3), timeout_s=120,
                          pg_timeout_s=20, expect_fail=True)
    assert all(not r.ok for r in res)
    errs = " | ".join((r.exc_msg or "") for r in res)
    assert "could not prove it holds this job's secret" in errs or "failed the challenge" in errs, errs
