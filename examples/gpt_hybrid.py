"""A small GPT-style byte-level language model trained with DP x TP x PP on plait, and the same model on one rank.

    # 8 ranks on this host as DP x TP x PP = 2 x 2 x 2 (sequence parallelism on, 1F1B, 4 micro-batches):
    torchrun --standalone --nproc-per-node 8 examples/gpt_hybrid.py --dp 2 --tp 2 --pp 2 --steps 200
    # the 1-rank reference (plain dense PyTorch, no torch.distributed):
    python examples/gpt_hybrid.py --steps 200
    # both, one after the other, and a plot of both loss curves:
    python examples/gpt_hybrid.py --compare --steps 200 --plot docs/parallel-example.png

Data: the Python standard library's own sources (available offline wherever Python is), read as bytes (vocabulary
256), in a fixed file order; each step draws its global batch of windows from a generator seeded by the step, so every
layout sees exactly the same batch.

Model (``--hidden 64 --heads 4 --layers 4 --seq 64``): token + position embedding, pre-LayerNorm blocks
(``plait.parallel.blocks``), final LayerNorm, LM head, mean cross-entropy. The parallel model is built from the dense
one (``from_dense``), so both start from the same weights:

- TP: ``VocabParallelEmbedding``, ``ParallelTransformerBlock`` (column-parallel QKV / MLP-in, row-parallel
  projections), a column-parallel LM head whose sharded logits go straight into ``vocab_parallel_cross_entropy``;
  with ``--sp`` (default on) activations between the layers are sharded along the sequence.
- PP: ``plait.parallel.pipeline.Pipeline`` over the layer list ``[embed, block x layers, head]``, 1F1B.
- DP: each DP replica takes its contiguous share of the global batch; gradients are summed over the DP group and
  divided by the DP size (equal shares: the global mean).

The mesh is ``init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))`` on the plait backend.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256


# ---------------------------------------------------------------------------------------------------------------- data


def load_text(nbytes: int = 2_000_000) -> torch.Tensor:
    """The first ``nbytes`` of the standard library's top-level ``*.py`` files, in sorted order, as uint8 ids."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise RuntimeError("no standard library sources found (sysconfig stdlib path has no *.py files)")
    buf = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            buf += fh.read()
        if len(buf) >= nbytes:
            break
    return torch.frombuffer(buf[:nbytes], dtype=torch.uint8).to(torch.int64)


def global_batch(data: torch.Tensor, step: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``[batch, seq + 1]`` windows, identical on every rank for a given step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------------------------- model


class Embed(nn.Module):
    """ids ``[batch, seq]`` -> ``[seq, batch, hidden]``."""

    def __init__(self, seq, hidden, dtype=None):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, hidden, dtype=dtype)
        self.pos = nn.Embedding(seq, hidden, dtype=dtype)

    def forward(self, ids):
        x = self.tok(ids.t())
        return x + self.pos.weight[: ids.shape[1]].unsqueeze(1)


class Head(nn.Module):
    def __init__(self, hidden, dtype=None):
        super().__init__()
        self.ln = nn.LayerNorm(hidden, dtype=dtype)
        self.out = nn.Linear(hidden, VOCAB, dtype=dtype)

    def forward(self, x):
        return self.out(self.ln(x))


def dense_model(hidden=64, heads=4, layers=4, seq=64, dtype=torch.float32, seed=0, recompute=False) -> nn.Sequential:
    from plait.parallel.blocks import TransformerBlock

    torch.manual_seed(seed)
    mods = [Embed(seq, hidden, dtype)] + [TransformerBlock(hidden, heads, recompute=recompute, dtype=dtype)
                                          for _ in range(layers)] + [Head(hidden, dtype)]
    return nn.Sequential(*mods)


def dense_loss(logits, target):
    """logits ``[seq, batch, vocab]``, target ``[batch, seq]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.t().reshape(-1))


class ParallelEmbed(nn.Module):
    def __init__(self, dense: Embed, tp, sp):
        super().__init__()
        from plait.parallel import VocabParallelEmbedding

        self.tok = VocabParallelEmbedding.from_dense(dense.tok, tp)
        self.pos = dense.pos  # replicated: every rank sees the full sequence here
        self.tp, self.sp = tp, sp

    def forward(self, ids):
        from plait.parallel import scatter_to_sequence_region

        x = self.tok(ids.t()) + self.pos.weight[: ids.shape[1]].unsqueeze(1)
        return scatter_to_sequence_region(x, self.tp) if self.sp else x


class ParallelHead(nn.Module):
    def __init__(self, dense: Head, tp, sp):
        super().__init__()
        from plait.parallel import ColumnParallelLinear
        from plait.parallel.blocks import _ParallelLayerNorm

        self.ln = _ParallelLayerNorm(dense.ln.normalized_shape[0], tp, sp, dtype=dense.ln.weight.dtype)
        self.ln.load_state_dict(dense.ln.state_dict())
        self.out = ColumnParallelLinear.from_dense(dense.out, tp, sequence_parallel=sp)

    def forward(self, x):
        return self.out(self.ln(x))  # logits [seq, batch, this rank's vocab chunk]


def parallel_model(dense: nn.Sequential, tp, sp=True, recompute=False) -> nn.Sequential:
    from plait.parallel import ParallelTransformerBlock

    mods = [ParallelEmbed(dense[0], tp, sp)]
    mods += [ParallelTransformerBlock.from_dense(b, tp, sequence_parallel=sp, recompute=recompute)
             for b in list(dense)[1:-1]]
    mods.append(ParallelHead(dense[-1], tp, sp))
    return nn.Sequential(*mods)


# ------------------------------------------------------------------------------------------------------------ training


def train_reference(steps, cfg, log=print, return_model=False):
    data = load_text()
    model = dense_model(cfg["hidden"], cfg["heads"], cfg["layers"], cfg["seq"], getattr(torch, cfg["dtype"]),
                        seed=cfg["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = global_batch(data, step, cfg["batch"], cfg["seq"], cfg["seed"])
        loss = dense_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % cfg["log_every"] == 0 or step == steps - 1:
            log(f"[reference] step {step:4d} loss {losses[-1]:.4f}")
    return (losses, model) if return_model else losses


def dense_state(pipe) -> dict:
    """This stage's layers gathered back to dense tensors, keyed like the dense model's ``state_dict`` (collective over
    the TP group)."""
    from plait.parallel import ParallelTransformerBlock

    out = {}
    first = pipe.layer_range[0]
    for i, layer in enumerate(pipe.stage):
        if isinstance(layer, ParallelTransformerBlock):
            sd = layer.to_dense().state_dict()
        elif isinstance(layer, ParallelEmbed):
            sd = {"tok.weight": layer.tok.to_dense().weight, "pos.weight": layer.pos.weight}
        else:
            d = layer.out.to_dense()
            sd = {"ln.weight": layer.ln.weight, "ln.bias": layer.ln.bias, "out.weight": d.weight, "out.bias": d.bias}
        out.update({f"{first + i}.{k}": v.detach().clone() for k, v in sd.items()})
    return out


def train_hybrid(steps, cfg, dp, tp, pp, log=print, return_pipe=False):
    """One rank's part of the DP x TP x PP run (the process group is initialised). Returns the global loss per step
    (identical on every rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from plait.parallel import vocab_parallel_cross_entropy
    from plait.parallel.pipeline import Pipeline

    if dist.get_world_size() != dp * tp * pp:
        raise ValueError(f"world size {dist.get_world_size()} != dp x tp x pp = {dp} x {tp} x {pp}")
    if cfg["batch"] % dp:
        raise ValueError(f"global batch {cfg['batch']} is not a multiple of dp {dp}")
    mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    tp_g, pp_g, dp_g = (mesh, "tp"), (mesh, "pp"), mesh.get_group("dp")
    dp_rank = mesh.get_local_rank("dp")
    data = load_text()
    dense = dense_model(cfg["hidden"], cfg["heads"], cfg["layers"], cfg["seq"], getattr(torch, cfg["dtype"]),
                        seed=cfg["seed"])
    model = parallel_model(dense, tp_g, cfg["sp"], cfg["recompute"])
    del dense
    pipe = Pipeline(model, group=pp_g, abort_groups=[mesh.get_group("tp"), dp_g])
    params = list(pipe.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)

    def loss_fn(logits, target):
        return vocab_parallel_cross_entropy(logits, target.t(), group=tp_g, vocab_size=VOCAB)

    share = cfg["batch"] // dp
    losses = []
    for step in range(steps):
        ids = global_batch(data, step, cfg["batch"], cfg["seq"], cfg["seed"])[dp_rank * share: (dp_rank + 1) * share]
        loss = pipe.step(ids[:, :-1], target=ids[:, 1:], loss_fn=loss_fn, chunks=cfg["chunks"], schedule="1f1b")
        if dp > 1:  # equal shares: the mean over DP replicas of their mean losses / gradients is the global mean
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.reshape(1).to(params[0].dtype)])
            dist.all_reduce(flat, group=dp_g)
            flat /= dp
            off = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off: off + n].view_as(p))
                off += n
            loss = flat[-1]
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if dist.get_rank() == 0 and (step % cfg["log_every"] == 0 or step == steps - 1):
            log(f"[dp{dp} tp{tp} pp{pp}] step {step:4d} loss {losses[-1]:.4f}")
    return (losses, pipe) if return_pipe else losses


DEFAULTS = dict(hidden=64, heads=4, layers=4, seq=64, batch=8, chunks=4, lr=3e-3, seed=0, sp=True, recompute=False,
                log_every=20, dtype="float32")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backend", default="plait")
    ap.add_argument("--no-sp", action="store_true", help="no sequence parallelism")
    ap.add_argument("--recompute", action="store_true", help="activation recomputation in the blocks")
    ap.add_argument("--json", help="write the loss curve here (rank 0)")
    ap.add_argument("--compare", action="store_true", help="run the 8-rank 2x2x2 job and the reference, and compare")
    ap.add_argument("--plot", help="with --compare: write a PNG of both loss curves")
    for k in ("hidden", "heads", "layers", "seq", "batch", "chunks", "seed"):
        ap.add_argument(f"--{k}", type=int, default=DEFAULTS[k])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    a = ap.parse_args()
    cfg = dict(DEFAULTS, **{k: getattr(a, k) for k in ("hidden", "heads", "layers", "seq", "batch", "chunks", "seed",
                                                         "lr", "dtype")}, sp=not a.no_sp, recompute=a.recompute)
    torch.set_num_threads(1)
    if a.compare:
        return compare(a, cfg)
    if a.dp * a.tp * a.pp == 1 and "RANK" not in os.environ:
        t0 = time.perf_counter()
        losses = train_reference(a.steps, cfg)
        print(f"[reference] {a.steps} steps in {time.perf_counter() - t0:.1f} s")
    else:
        import torch.distributed as dist
        import plait  # noqa: F401  (registers the backend)

        dist.init_process_group(a.backend)
        t0 = time.perf_counter()
        losses = train_hybrid(a.steps, cfg, a.dp, a.tp, a.pp)
        if dist.get_rank() == 0:
            print(f"[dp{a.dp} tp{a.tp} pp{a.pp}] {a.steps} steps in {time.perf_counter() - t0:.1f} s")
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cfg": cfg, "dp": a.dp, "tp": a.tp, "pp": a.pp, "losses": losses}, f)


def compare(a, cfg):
    import tempfile

    tmp = tempfile.mkdtemp()
    common = ["--steps", str(a.steps)] + [x for k in ("hidden", "heads", "layers", "seq", "batch", "chunks", "seed")
                                          for x in (f"--{k}", str(cfg[k]))] + ["--lr", str(cfg["lr"]), "--dtype", cfg["dtype"]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "8"]
    runs = {"hybrid": torchrun + [__file__, "--dp", "2", "--tp", "2", "--pp", "2"], "reference": [sys.executable, __file__]}
    curves = {}
    for name, cmd in runs.items():
        out = os.path.join(tmp, name + ".json")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.perf_counter()
        extra = (["--no-sp"] if not cfg["sp"] else []) + (["--recompute"] if cfg["recompute"] else [])
        if name == "hybrid":
            extra += ["--backend", a.backend]
        subprocess.run(cmd + common + ["--json", out] + extra, check=True, env=env)
        curves[name] = json.load(open(out))["losses"]
        print(f"{name}: {time.perf_counter() - t0:.1f} s wall")
    h, r = curves["hybrid"], curves["reference"]
    if len(h) != len(r) or len(h) != a.steps:
        raise SystemExit(f"loss curves of different lengths: hybrid {len(h)}, reference {len(r)}, steps {a.steps}")
    diff = max(abs(x - y) for x, y in zip(h, r))
    print(f"max |loss difference| over {len(h)} steps: {diff:.3g}; final loss hybrid {h[-1]:.4f} reference {r[-1]:.4f}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(r, label="1 rank (dense PyTorch reference)", lw=2.5, alpha=0.6)
        ax.plot(h, label="8 ranks, DP x TP x PP = 2 x 2 x 2 on plait", lw=1, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (bytes, cross-entropy)")
        ax.set_title(f"examples/gpt_hybrid.py: max |difference| {diff:.2g}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        with open(os.path.splitext(a.plot)[0] + ".json", "w") as f:
            json.dump({"cfg": cfg, "hybrid": h, "reference": r, "max_abs_diff": diff}, f)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
