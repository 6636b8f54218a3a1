"""Pipeline parallelism: split an ``nn.Sequential``-like model into stages over a process group.

Every rank of the pipeline group builds the *full* model (so every rank starts from the same weights) and wraps it
in :class:`Pipeline`, which keeps only the layers of its own stage: stage ``s`` is group rank ``s``. ``step`` splits
the batch into micro-batches (``torch.chunk`` along dimension 0), runs a GPipe or 1F1B schedule over point-to-point
operations, accumulates the stage's parameter gradients (the caller runs the optimizer) and returns the full-batch
loss on every rank of the group::

    model = nn.Sequential(...)                     # the same weights on every rank (seeded)
    pipe = Pipeline(model, group=pp_group)        # boundaries by layer count, or balance=[...], or measured
    opt = torch.optim.SGD(pipe.parameters(), lr=0.1)
    loss = pipe.step(x, target=y, loss_fn=F.mse_loss, chunks=8, schedule="1f1b")
    opt.step(); opt.zero_grad()

Only stage 0 reads ``inputs`` and only the last stage reads ``target``; other ranks may pass ``None``.

Conventions:

- **Groups.** ``group`` is anything :func:`plait.parallel._groups.resolve_group` accepts (``None``, a process group,
  a 1-D ``DeviceMesh``, ``(mesh, "pp")``). Point-to-point calls address peers by *global* rank, so a pipeline can be
  the PP dimension of a DP x TP x PP mesh whose stage modules run their own collectives on other groups.
- **Messages.** Each activation or gradient is preceded by a small int64 header (kind, schedule, step number,
  micro-batch index and count, batch size, dtype, shape). The receiver allocates from it, so activations may have any
  shape and dtype, micro-batches may be uneven, and any disagreement between ranks (a different ``chunks`` or
  ``schedule``, a gradient whose shape is not the activation's) raises instead of mixing bytes. Sends are ``isend``
  and never wait for the receiver, so no order of stages and micro-batches can deadlock.
- **Loss.** ``loss_fn(output, target_chunk)`` must return the *mean* over the micro-batch (``reduction="mean"``,
  the default) or the *sum* (``reduction="sum"``). Mean losses are weighted by each micro-batch's share of the batch,
  so uneven micro-batches give exactly the full-batch mean, and the gradients equal the unsplit model's.
- **Failures.** An exception on a stage (a layer that raises, a shape that does not fit, a bad argument) aborts the
  pipeline group (``ProcessGroup.abort()``; on plait the peers hear of it at once) and any ``abort_groups`` given, then
  re-raises as :class:`PipelineError` naming the stage, rank, layer and sizes. Ranks waiting on the aborted group
  raise :class:`PipelineError` too ("aborted ... after a failure elsewhere"), so every rank raises instead of hanging.
  A pipeline that raised is unusable (its group is aborted).
- **Stage boundaries.** ``balance`` (layers per stage) given explicitly, or chosen by :func:`partition` from measured
  per-layer costs (:func:`profile_layers` on ``sample_input``) and optional per-stage ``speeds``. Whatever decides the
  boundaries is checked to agree on every rank of the group at construction (an all-reduce of the balance); a
  disagreement raises on every rank. With ``sample_input``, every rank must profile (or none): one all-reduce of a
  flag checks it first, and a rank without it (or whose profiling raised) makes every rank raise.
- **Memory.** Sends whose payload has been delivered are dropped as the step runs (an activation's send at the
  latest when its gradient comes back), so under 1F1B a stage holds the activations of its in-flight micro-batches
  only, not of every micro-batch of the step. A stage's received activation is its input without a copy and is not
  an autograd leaf, so its first layer may work in place (``nn.ReLU(inplace=True)``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import OrderedDict
from fractions import Fraction
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from plait.parallel._groups import global_rank, resolve_group

__all__ = ["Pipeline", "PipelineError", "partition", "profile_layers", "agree_costs", "gather_costs", "schedule_ops"]

_P = "plait.parallel.pipeline"


class PipelineError(RuntimeError):
    """A pipeline step failed on this rank or on another rank of the pipeline group."""


class _CommFailure(Exception):
    """A point-to-point call of the pipeline raised (usually: a peer failed and aborted the group)."""


# ---------------------------------------------------------------------------------------------------------------------
# Partitioning


def _check_costs_row(row, what):
    out = []
    for i, c in enumerate(row):
        c = float(c)
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"{_P}.partition: {what}[{i}] = {c!r}; costs must be finite and >= 0")
        out.append(c)
    return out


def partition(costs, num_stages: int, speeds: Sequence[float] | None = None) -> list[int]:
    """Split layers into ``num_stages`` contiguous stages minimising the slowest stage's time.

    Args:
        costs: per-layer costs (e.g. seconds of forward + backward), one list used for every stage, or a list of
            ``num_stages`` lists (``costs[s][l]``: layer ``l``'s cost measured on stage ``s``'s rank, as
            :func:`gather_costs` returns), which captures unequal hardware without ``speeds``.
        num_stages: number of stages (``1 <= num_stages <= len(layers)``); every stage gets at least one layer.
        speeds: optional relative speed of each stage's rank (``speeds[s] > 0``); stage ``s``'s time is the sum of
            its layers' costs divided by ``speeds[s]``. A rank half as fast (speed 0.5) gets half the work of a
            speed-1 rank: 6 equal layers over speeds ``[1, 0.5]`` give ``[4, 2]``.

    Returns:
        the number of layers of each stage (``balance``), summing to the number of layers.

    The result is exact (dynamic programming over all contiguous splits) and deterministic: the slowest stage's time
    is minimal; among splits with the same bottleneck the one with the smallest sum of squared stage times is chosen
    (stages are balanced beyond the bottleneck; exact for the bottleneck, a greedy refinement for the rest), and a
    remaining tie gives later stages more layers (they hold fewer in-flight micro-batches under 1F1B). Segment sums
    are computed exactly (rational prefix sums, rounded once), so equal inputs give equal boundaries on every rank.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"{_P}.partition: num_stages must be a positive int, got {num_stages!r}")
    costs = list(costs)
    if costs and isinstance(costs[0], (list, tuple, torch.Tensor)):
        if len(costs) != num_stages:
            raise ValueError(f"{_P}.partition: per-stage costs have {len(costs)} rows for {num_stages} stages")
        rows = [_check_costs_row(list(r), f"costs[{s}]") for s, r in enumerate(costs)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"{_P}.partition: per-stage cost rows differ in length: {[len(r) for r in rows]}")
    else:
        rows = [_check_costs_row(costs, "costs")] * num_stages
    n = len(rows[0])
    if n < num_stages:
        raise ValueError(f"{_P}.partition: {n} layers cannot fill {num_stages} stages (each stage needs a layer)")
    if speeds is None:
        speeds = [1.0] * num_stages
    speeds = [float(v) for v in speeds]
    if len(speeds) != num_stages:
        raise ValueError(f"{_P}.partition: {len(speeds)} speeds for {num_stages} stages")
    for s, v in enumerate(speeds):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{_P}.partition: speeds[{s}] = {v!r}; speeds must be finite and > 0")

    # exact prefix sums per distinct row; segment time = float(exact sum) / speed
    prefix_cache: dict[int, list[Fraction]] = {}

    def prefixes(row):
        key = id(row)
        if key not in prefix_cache:
            acc = [Fraction(0)]
            for c in row:
                acc.append(acc[-1] + Fraction(c))
            prefix_cache[key] = acc
        return prefix_cache[key]

    def seg_time(s, i, j):
        p = prefixes(rows[s])
        return float(p[j] - p[i]) / speeds[s]

    INF = (math.inf, math.inf)
    # best[s][j]: (bottleneck, sum of squares) of the best split of layers [0, j) into stages 0..s; arg[s][j]: start
    best = [[INF] * (n + 1) for _ in range(num_stages)]
    arg = [[-1] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n - num_stages + 2):
        t = seg_time(0, 0, j)
        best[0][j] = (t, t * t)
        arg[0][j] = 0
    for s in range(1, num_stages):
        for j in range(s + 1, n - (num_stages - 1 - s) + 1):
            cur, cur_i = INF, -1
            for i in range(s, j):  # stage s holds layers [i, j); stages 0..s-1 hold [0, i)
                prev = best[s - 1][i]
                if prev[0] == math.inf:
                    continue
                t = seg_time(s, i, j)
                cand = (max(prev[0], t), prev[1] + t * t)
                if cand < cur:  # strict: the smallest i wins a tie (later stages get more layers)
                    cur, cur_i = cand, i
            best[s][j], arg[s][j] = cur, cur_i
    if not math.isfinite(best[num_stages - 1][n][0]) or arg[num_stages - 1][n] < 0:
        raise ValueError(f"{_P}.partition: no split of the {n} layers over {num_stages} stages has a finite slowest-stage "
                         f"time (costs / speeds overflow: speeds {speeds}); rescale the costs or speeds")
    bounds = [n]
    j = n
    for s in range(num_stages - 1, 0, -1):
        j = arg[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [bounds[k + 1] - bounds[k] for k in range(num_stages)]


def _as_layers(layers) -> list[tuple[str, nn.Module]]:
    if isinstance(layers, nn.Sequential):
        # _modules, not named_children(): a module object that appears twice (``act = nn.ReLU()`` reused) is two
        # layers of the model, and named_children() would skip the second occurrence
        return [(name, m) for name, m in layers._modules.items() if m is not None]
    if isinstance(layers, nn.ModuleList):
        return [(str(i), m) for i, m in enumerate(layers)]
    if isinstance(layers, (list, tuple)):
        out = []
        for i, m in enumerate(layers):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{_P}: layers[{i}] is a {type(m).__name__}, not an nn.Module")
            out.append((str(i), m))
        return out
    raise TypeError(f"{_P}: layers must be an nn.Sequential, nn.ModuleList or list of modules, "
                    f"got {type(layers).__name__}")


def profile_layers(layers, sample_input: torch.Tensor, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Measure each layer's forward + backward time in seconds (median over ``repeats``, after ``warmup`` runs).

    The layers run in sequence on ``sample_input`` (layer ``l`` gets layer ``l-1``'s output, detached so that each
    layer's backward is timed alone); the backward of the last layer starts from a gradient of ones, each earlier one
    from the input gradient of the layer after it. Layers whose output does not require grad count their forward only.
    The model is left as it was: parameter gradients are restored to what they were before the call, buffers
    (BatchNorm running statistics, ``num_batches_tracked``) are saved and restored, the global random number
    generators (CPU, and CUDA on the devices involved) are forked so that dropout here consumes none of the caller's
    random stream, and the layers run in the training mode they are in (which is not changed).
    """
    named = _as_layers(layers)
    if repeats < 1:
        raise ValueError(f"{_P}.profile_layers: repeats must be >= 1, got {repeats}")
    params = list({id(p): p for _, m in named for p in m.parameters()}.values())
    buffers = list({id(b): b for _, m in named for b in m.buffers()}.values())
    old_grads = [p.grad for p in params]
    old_bufs = [b.detach().clone() for b in buffers]
    for p in params:  # backward would accumulate into (modify) the caller's .grad tensors in place
        p.grad = None
    cuda = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in [sample_input] + params + buffers if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            return _profile(named, sample_input, repeats, warmup)
    finally:
        with torch.no_grad():
            for b, old in zip(buffers, old_bufs):
                b.copy_(old)
        for p, g in zip(params, old_grads):
            p.grad = g


def _profile(named, sample_input, repeats, warmup):
    times = [[] for _ in named]
    for it in range(warmup + repeats):
        x = sample_input
        saved = []
        fwd = []
        for _, m in named:
            xin = x.detach()
            if xin.is_floating_point() or xin.is_complex():
                xin.requires_grad_(True)
            t0 = time.perf_counter()
            out = m(xin)
            fwd.append(time.perf_counter() - t0)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{_P}.profile_layers: layer {len(saved)} returned {type(out).__name__}, "
                                "pipeline stages pass single tensors")
            saved.append((xin, out))
            x = out
        bwd = [0.0] * len(named)
        grad = None
        for li in range(len(named) - 1, -1, -1):
            xin, out = saved[li]
            if out.requires_grad:
                g = torch.ones_like(out) if grad is None or grad.shape != out.shape else grad
                t0 = time.perf_counter()
                torch.autograd.backward(out, g)
                bwd[li] = time.perf_counter() - t0
            grad = xin.grad if xin.requires_grad else None
        if it >= warmup:
            for li in range(len(named)):
                times[li].append(fwd[li] + bwd[li])
    return [statistics.median(t) for t in times]


def _group_check_equal_lengths(values: list[float], pg, what: str) -> None:
    t = torch.tensor([len(values), -len(values)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"{_P}.{what}: ranks passed cost lists of different lengths "
                         f"(between {-int(t[1])} and {int(t[0])}; this rank {len(values)})")


def agree_costs(costs: Sequence[float], group=None, how: str = "max") -> list[float]:
    """Make per-layer costs identical on every rank of ``group`` (a collective: every rank must call it).

    ``how``: ``"max"`` (each layer's largest measurement; robust to one rank being disturbed), ``"mean"``, or
    ``"rank0"`` (group rank 0's measurement, broadcast). Ranks passing lists of different lengths all raise.
    """
    if how not in ("max", "mean", "rank0"):
        raise ValueError(f"{_P}.agree_costs: how must be 'max', 'mean' or 'rank0', got {how!r}")
    pg = resolve_group(group)
    costs = [float(c) for c in costs]
    _group_check_equal_lengths(costs, pg, "agree_costs")
    t = torch.tensor(costs, dtype=torch.float64)
    if how == "rank0":
        dist.broadcast(t, src=global_rank(pg, 0), group=pg)
    elif how == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
        t /= dist.get_world_size(pg)
    return t.tolist()


def gather_costs(costs: Sequence[float], group=None) -> list[list[float]]:
    """Every rank's per-layer costs, indexed by group rank (a collective), for :func:`partition`'s per-stage form."""
    pg = resolve_group(group)
    costs = [float(c) for c in costs]
    _group_check_equal_lengths(costs, pg, "gather_costs")
    t = torch.tensor(costs, dtype=torch.float64)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(out, t, group=pg)
    return [o.tolist() for o in out]


# ---------------------------------------------------------------------------------------------------------------------
# Messages

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_MAGIC = 0x504C4149  # "PLAI"
_ACT, _GRAD = 1, 2
_KIND_NAME = {_ACT: "activation", _GRAD: "gradient"}
_SCHEDULES = {"gpipe": 1, "1f1b": 2, "forward": 3}
_SCHED_NAME = {v: k for k, v in _SCHEDULES.items()}
# magic, kind, schedule, step, micro-batch, micro-batch count, batch size, micro-batch rows, dtype, requires_grad, ndim
_FIXED = 11
_MAX_DIM = 13
_HEADER = _FIXED + _MAX_DIM


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(x)) for x in shape) + ")"


def _layer_desc(name: str, m: nn.Module) -> str:
    text = repr(m).split("\n")[0]
    if len(text) > 80:
        text = text[:77] + "..."
    return f"layer {name} ({text})"


class Pipeline(nn.Module):
    """This rank's stage of a pipeline-parallel model.

    Args:
        layers: the full model on every rank: an ``nn.Sequential`` (child names are kept, so this stage's
            ``state_dict`` keys are ``stage.<name>.<param>``, matching the full model's ``<name>.<param>``), an
            ``nn.ModuleList`` or a list of modules. Each layer takes one tensor and returns one tensor. A module
            listed twice (``act = nn.ReLU()`` reused) is two layers. Parameters shared by layers of *different*
            stages (tied weights across a stage boundary) are not supported: construction raises ``ValueError`` on
            every rank naming the layers and stages (each stage would get only part of the gradient).
        group: the pipeline group (anything ``resolve_group`` accepts); stage ``s`` is group rank ``s``.
        balance: layers per stage (``len == group size``, each >= 1, summing to the number of layers). Default:
            chosen by :func:`partition`, from measured costs when ``sample_input`` is given (each rank profiles the
            whole model with :func:`profile_layers`; without ``speeds`` the per-rank measurements are gathered so a
            slower rank gets less work; with ``speeds`` the costs are agreed by maximum and divided by the speeds),
            otherwise from equal per-layer costs and ``speeds``.
        sample_input: a batch for layer 0, used only to profile layer costs.
        speeds: relative speed of each stage's rank, for :func:`partition`.
        profile_repeats: repeats for :func:`profile_layers`.
        device: where received activations and gradients are allocated; default: the device of the stage's first
            parameter or buffer, else CPU.
        abort_groups: other process groups to abort when this stage fails (e.g. the tensor-parallel group its layers
            run collectives on, so that its partners raise too). The pipeline group itself is always aborted.

    Attributes: ``stage`` (``nn.Sequential`` of this stage's layers), ``stage_index``, ``num_stages``, ``balance``,
    ``layer_range`` (``(first, end)`` indices in the full model), ``group`` (the process group), ``prev_rank`` /
    ``next_rank`` (global ranks of the neighbouring stages, ``None`` at the ends).
    """

    def __init__(self, layers, group=None, *, balance: Sequence[int] | None = None,
                 sample_input: torch.Tensor | None = None, speeds: Sequence[float] | None = None,
                 profile_repeats: int = 3, device: torch.device | str | None = None, abort_groups=()):
        super().__init__()
        named = _as_layers(layers)
        pg = resolve_group(group)
        self.group = pg
        S = dist.get_world_size(pg)
        s = dist.get_rank(pg)
        if s < 0:
            raise ValueError(f"{_P}: this rank ({dist.get_rank()}) is not a member of the pipeline group")
        self.num_stages, self.stage_index = S, s
        self.rank = dist.get_rank()
        self.abort_groups = [resolve_group(g) for g in abort_groups]
        L = len(named)
        where = f"{_P}: stage {s} (rank {self.rank})"
        problem = None
        # Profiling runs collectives (gather/agree the costs), so every rank must agree first that all of them
        # profile, and that the profiling worked everywhere: one all-reduce of two flags, on every rank.
        profiles = balance is None and sample_input is not None and L >= S
        local, prof_err = None, None
        if profiles:
            try:
                local = profile_layers(_named_to_seq(named), sample_input, repeats=profile_repeats)
            except Exception as e:
                prof_err = f"{type(e).__name__}: {e}"
        t = torch.tensor([int(profiles), -int(profiles), int(prof_err is not None)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
        if int(t[0]) != -int(t[1]):
            raise ValueError(f"{where}: some ranks of the pipeline group profile layer costs (balance=None with a "
                             f"sample_input) and others do not (this rank: "
                             f"{'profiles' if profiles else 'does not profile'}); pass sample_input (and no "
                             "balance) on every rank, or on none")
        if int(t[2]):
            raise ValueError(f"{where}: profiling the layer costs on sample_input failed "
                             + (f"on this rank: {prof_err}" if prof_err else "on another rank (see its error)"))
        if L < S:
            problem = f"{where}: {L} layers cannot fill {S} stages (each stage needs at least one layer)"
            balance = [0] * S
        elif balance is None:
            if profiles:
                if speeds is None:
                    balance = partition(gather_costs(local, pg), S)
                else:
                    balance = partition(agree_costs(local, pg, "max"), S, speeds)
            else:
                balance = partition([1.0] * L, S, speeds)
        balance = [int(b) for b in balance]
        if problem is None and (len(balance) != S or any(b < 1 for b in balance) or sum(balance) != L):
            problem = (f"{where}: bad balance {balance}: need {S} entries (one per stage), each >= 1, summing to "
                       f"the {L} layers")
        if problem is None:
            problem = _shared_across_stages(named, balance, where)
        # Every rank must cut the model at the same places. One all-reduce decides, so that a rank with a bad or
        # different balance makes every rank raise (none waits for it in a later collective).
        vec = [1 if problem else 0, L] + (balance if problem is None else [0] * S)
        t = torch.tensor(vec + [-v for v in vec], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pg)
        n = len(vec)
        hi, lo = t[:n].tolist(), [-v for v in t[n:].tolist()]
        if problem:
            raise ValueError(problem)
        if hi[0]:
            raise ValueError(f"{where}: another rank of the pipeline group has a bad balance, too few layers or "
                             "parameters shared across stages (see its error)")
        if hi[1] != lo[1]:
            raise ValueError(f"{where}: ranks of the pipeline group have models of different lengths (between "
                             f"{lo[1]} and {hi[1]} layers; this rank {L})")
        if hi[2:] != lo[2:]:
            raise ValueError(f"{where}: ranks of the pipeline group disagree on the balance (this rank {balance}; "
                             f"per-stage max {hi[2:]}, min {lo[2:]}); pass the same balance, or costs agreed with "
                             "agree_costs/gather_costs, on every rank")
        self.balance = balance
        first = sum(balance[:s])
        self.layer_range = (first, first + balance[s])
        self.stage = nn.Sequential(OrderedDict(named[first:first + balance[s]]))
        self.prev_rank = global_rank(pg, s - 1) if s > 0 else None
        self.next_rank = global_rank(pg, s + 1) if s < S - 1 else None
        if device is None:
            t0 = next(iter(list(self.stage.parameters()) + list(self.stage.buffers())), None)
            device = t0.device if t0 is not None else torch.device("cpu")
        self.device = torch.device(device)
        self._step_no = 0
        self._failed: str | None = None
        self._pending: list = []  # (work, payload, (kind, micro-batch)) of isends not yet known to be complete
        self._anchor = torch.zeros((), requires_grad=True)  # gives _Entry's output a grad_fn (receives no grad)

    # -- messages ------------------------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"stage {self.stage_index} (rank {self.rank})"

    def _peer(self, global_r) -> str:
        st = self.stage_index - 1 if global_r == self.prev_rank else self.stage_index + 1
        return f"stage {st} (rank {global_r})"

    def _send(self, t: torch.Tensor, dst: int, kind: int, mb: int, meta) -> None:
        sched, n, batch, rows = meta
        if t.dtype not in _DTYPE_CODE:
            raise PipelineError(f"{_P}: {self._where()}: cannot send a {t.dtype} {_KIND_NAME[kind]}")
        if t.dim() > _MAX_DIM:
            raise PipelineError(f"{_P}: {self._where()}: {_KIND_NAME[kind]} has {t.dim()} dimensions; "
                                f"at most {_MAX_DIM} are supported")
        h = torch.zeros(_HEADER, dtype=torch.int64)
        h[:_FIXED] = torch.tensor([_MAGIC, kind, sched, self._step_no, mb, n, batch, rows, _DTYPE_CODE[t.dtype],
                                   int(t.requires_grad), t.dim()], dtype=torch.int64)
        if t.dim():
            h[_FIXED:_FIXED + t.dim()] = torch.tensor(list(t.shape), dtype=torch.int64)
        payload = t.detach().contiguous()
        if h.device != payload.device:
            h = h.to(payload.device)
        try:
            self._pending.append((dist.isend(h, dst, group=self.group), h, (kind, mb)))
            if payload.numel():
                self._pending.append((dist.isend(payload, dst, group=self.group), payload, (kind, mb)))
        except Exception as e:
            raise _CommFailure(f"sending to {self._peer(dst)}: {e}") from e
        self._trim_sends()

    def _recv(self, src: int, kind: int, mb: int, my_sched: int, meta):
        """Receive one message; ``meta`` is (schedule code, n, batch, rows) or None (learned from this message)."""
        h = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        peer = self._peer(src)
        try:
            dist.recv(h, src, group=self.group)
        except Exception as e:
            raise _CommFailure(f"receiving from {peer}: {e}") from e
        h = h.cpu().tolist()
        if h[0] != _MAGIC:
            raise PipelineError(f"{_P}: {self._where()}: received a malformed header from {peer} "
                                "(another message on the pipeline's point-to-point channel?)")
        _, k, sched, step, mbi, n, batch, rows, dcode, req, ndim = h[:_FIXED]
        if k != kind or step != self._step_no or mbi != mb:
            raise PipelineError(
                f"{_P}: {self._where()}: expected the {_KIND_NAME[kind]} of micro-batch {mb} of step "
                f"{self._step_no} from {peer}, got the {_KIND_NAME.get(k, k)} of micro-batch {mbi} of step {step}: "
                "the ranks run different schedules or step counts")
        if sched != my_sched:
            raise PipelineError(
                f"{_P}: {self._where()}: {peer} runs schedule {_SCHED_NAME.get(sched, sched)!r}, this stage "
                f"{_SCHED_NAME[my_sched]!r}: every rank of the pipeline must run the same schedule")
        if meta is not None and (n, batch) != (meta[1], meta[2]):
            raise PipelineError(
                f"{_P}: {self._where()}: {peer} sends micro-batch {mbi} of {n} of a batch of {batch}; this stage "
                f"runs {meta[1]} micro-batches of a batch of {meta[2]}")
        shape = h[_FIXED:_FIXED + ndim]
        buf = torch.empty(shape, dtype=_DTYPES[dcode], device=self.device)
        if buf.numel():
            try:
                dist.recv(buf, src, group=self.group)
            except Exception as e:
                raise _CommFailure(f"receiving from {peer}: {e}") from e
        return buf, bool(req), (sched, n, batch, rows)

    def _wait_sends(self, tag=None) -> None:
        """Wait for the pending sends (all, or those of ``tag`` = (kind, micro-batch)) and drop their payloads."""
        if tag is None:
            done, self._pending = self._pending, []
        else:
            done = [e for e in self._pending if e[2] == tag]
            self._pending = [e for e in self._pending if e[2] != tag]
        self._complete(done)

    @staticmethod
    def _complete(done) -> None:
        try:
            for w, _, _ in done:
                w.wait()
        except Exception as e:
            raise _CommFailure(f"completing a send: {e}") from e

    def _trim_sends(self) -> None:
        """Drop the sends that have completed, so their payloads (activations, gradients) are freed during the step
        rather than held to its end (a completed Work's ``wait`` returns at once, or raises its error)."""
        keep, done = [], []
        for e in self._pending:
            (done if e[0].is_completed() else keep).append(e)
        if done:
            self._pending = keep
            self._complete(done)

    # -- failures ------------------------------------------------------------------------------------------------

    def _abort(self) -> None:
        for g in [self.group] + self.abort_groups:
            try:
                g.abort()
            except Exception:  # a backend without abort (gloo): peers fall back to the group timeout
                pass

    def _fail(self, exc: BaseException):
        """Abort the group(s) so every peer raises, then raise ``exc`` as a PipelineError naming this stage."""
        if self._failed is None:
            self._failed = str(exc)
        self._pending = []
        self._abort()
        if isinstance(exc, PipelineError):
            raise exc
        if isinstance(exc, _CommFailure):  # usually a peer failed first and aborted the group
            raise PipelineError(f"{_P}: {self._where()}: a point-to-point operation failed (the pipeline group was "
                                f"aborted after a failure elsewhere, or a peer died) while {exc}") from exc.__cause__
        raise PipelineError(f"{_P}: {self._where()} failed: {type(exc).__name__}: {exc}") from exc

    def _check_usable(self):
        if self._failed is not None:
            raise PipelineError(f"{_P}: {self._where()}: this pipeline's group was aborted after an earlier failure "
                                f"({self._failed}); build a new group and Pipeline")

    # -- compute -------------------------------------------------------------------------------------------------

    def _run_stage(self, x: torch.Tensor, mb: int) -> torch.Tensor:
        first_name = next(iter(self.stage._modules))
        for name, m in self.stage._modules.items():  # not named_children(): it skips a module listed twice
            in_f = getattr(m, "in_features", None)
            if isinstance(m, nn.Linear) and isinstance(in_f, int) and (x.dim() == 0 or x.shape[-1] != in_f):
                if name != first_name:
                    origin = ""
                elif self.prev_rank is None:
                    origin = " (the input batch)"
                else:
                    origin = f" received from {self._peer(self.prev_rank)}"
                raise PipelineError(
                    f"{_P}: {self._where()}, {_layer_desc(name, m)} expects inputs with last dimension {in_f} but "
                    f"gets shape {_fmt_shape(x.shape)}{origin} on micro-batch {mb}")
            try:
                y = m(x)
            except Exception as e:
                raise PipelineError(f"{_P}: {self._where()}, {_layer_desc(name, m)} raised on micro-batch {mb} "
                                    f"(input shape {_fmt_shape(x.shape)}, {x.dtype}): "
                                    f"{type(e).__name__}: {e}") from e
            if not isinstance(y, torch.Tensor):
                raise PipelineError(f"{_P}: {self._where()}, {_layer_desc(name, m)} returned a "
                                    f"{type(y).__name__}; pipeline layers must return one tensor")
            x = y
        return x

    # -- training step -------------------------------------------------------------------------------------------

    def step(self, inputs: torch.Tensor | None = None, target=None, loss_fn: Callable | None = None,
             chunks: int = 1, schedule: str = "1f1b", reduction: str = "mean") -> torch.Tensor:
        """Run one forward + backward over the batch; accumulate this stage's parameter gradients.

        Args:
            inputs: the batch (stage 0 only; ignored elsewhere), split with ``torch.chunk(inputs, chunks)``: the
                number of micro-batches is the number of chunks torch.chunk returns (it may be below ``chunks``).
            target: the targets (last stage only; ignored elsewhere), split the same way; ``None`` calls
                ``loss_fn(output)``.
            loss_fn: ``loss_fn(output, target_chunk) -> scalar`` (the last stage only needs it).
            chunks: the requested number of micro-batches (the same on every rank).
            schedule: ``"1f1b"`` (warm-up of ``stages - stage - 1`` forwards, then one forward / one backward,
                then cool-down: at most ``stages - stage`` micro-batches' activations held) or ``"gpipe"`` (all
                forwards, then all backwards).
            reduction: ``"mean"`` (``loss_fn`` returns the micro-batch mean; micro-batch losses are weighted by
                their share of the batch, giving the full-batch mean) or ``"sum"`` (losses are added).

        Returns:
            the full-batch loss (detached, 0-dim, on every rank of the pipeline group).

        Gradients are accumulated into ``.grad`` (as ``loss.backward()`` would); call ``zero_grad`` as usual.
        """
        self._check_usable()
        self._step_no += 1
        try:
            # a bad argument on one rank fails the step like any other error: the group is aborted so that the peers
            # (which may have valid arguments and be waiting for this rank) raise too
            if schedule not in ("1f1b", "gpipe"):
                raise ValueError(f"schedule must be '1f1b' or 'gpipe', got {schedule!r}")
            if reduction not in ("mean", "sum"):
                raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
            _check_chunks(chunks)
            return self._step(inputs, target, loss_fn, chunks, _SCHEDULES[schedule], reduction)
        except Exception as e:
            self._fail(e)

    def _step(self, inputs, target, loss_fn, chunks, sched, reduction):
        S, s = self.num_stages, self.stage_index
        first, last = s == 0, s == S - 1
        if last and loss_fn is None:
            raise PipelineError(f"{_P}: {self._where()}: the last stage needs loss_fn")
        meta = None
        x_chunks = None
        if first:
            if not isinstance(inputs, torch.Tensor):
                raise PipelineError(f"{_P}: {self._where()}: stage 0 needs the input batch as a tensor, got "
                                    f"{type(inputs).__name__}")
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                raise PipelineError(f"{_P}: {self._where()}: the batch has shape {_fmt_shape(inputs.shape)}; it "
                                    "needs a non-empty dimension 0 to split into micro-batches")
            x_chunks = list(torch.chunk(inputs, chunks))
            meta = (sched, len(x_chunks), inputs.shape[0], 0)
        state: dict = {"meta": meta, "t_chunks": None, "loss": None, "sizes": {}}
        saved: dict[int, tuple] = {}

        def forward(i):
            if first:
                x = x_chunks[i].to(self.device)
                rows = x.shape[0]
                m = state["meta"]
            else:
                x, req, m = self._recv(self.prev_rank, _ACT, i, sched, state["meta"])
                if state["meta"] is None:
                    state["meta"] = m
                rows = m[3]
            state["sizes"][i] = rows
            gx = None
            if not first and req:
                # The received activation enters autograd through _Entry, which makes the buffer itself a non-leaf
                # (no copy) so a first layer that works in place (nn.ReLU(inplace=True)) is allowed; its gradient
                # is caught in gx for the send back to the previous stage.
                gx = []
                x = _Entry.apply(self._anchor, x, gx)
            y = self._run_stage(x, i)
            if last:
                loss = self._micro_loss(y, i, loss_fn, target, state, reduction)
                saved[i] = (x, gx, loss)
            else:
                mm = state["meta"]
                self._send(y, self.next_rank, _ACT, i, (mm[0], mm[1], mm[2], rows))
                saved[i] = (x, gx, y)

        def backward(i):
            self._trim_sends()
            x, gx, y = saved.pop(i)
            if last:
                if y.requires_grad:
                    self._backward(y, None, i)
            else:
                if y.requires_grad:
                    g, _, _ = self._recv(self.next_rank, _GRAD, i, sched, state["meta"])
                    if g.shape != y.shape or g.dtype != y.dtype:
                        raise PipelineError(
                            f"{_P}: {self._where()}: {self._peer(self.next_rank)} sent a gradient of shape "
                            f"{_fmt_shape(g.shape)} ({g.dtype}) for this stage's output of shape "
                            f"{_fmt_shape(y.shape)} ({y.dtype}) on micro-batch {i}")
                    # the next stage received this micro-batch's activation before it sent the gradient: the
                    # activation's send is done, drop it (memory: 1F1B holds only in-flight micro-batches)
                    self._wait_sends((_ACT, i))
                    self._backward(y, g, i)
            if gx is not None:
                g_in = gx[0] if gx else torch.zeros_like(x)
                del x, y
                mm = state["meta"]
                self._send(g_in, self.prev_rank, _GRAD, i, (mm[0], mm[1], mm[2], state["sizes"][i]))

        # Every stage's schedule starts with forward(0); the stages after the first learn the micro-batch count
        # from stage 0's first message, so they run it before they know the rest of the schedule.
        if not first:
            forward(0)
        ops = schedule_ops("gpipe" if sched == _SCHEDULES["gpipe"] else "1f1b", S, s, state["meta"][1])
        for kind, i in ops[0 if first else 1:]:
            if kind == "F":
                forward(i)
            else:
                backward(i)
        self._wait_sends()
        loss = state["loss"]
        if loss is None:
            loss = torch.zeros((), dtype=torch.float64)
        out = loss.detach().reshape(()).to(torch.float64).cpu().clone()
        if S > 1:
            try:
                dist.broadcast(out, src=global_rank(self.group, S - 1), group=self.group)
            except Exception as e:
                raise _CommFailure(f"in the loss broadcast from the last stage: {e}") from e
        return out

    def _micro_loss(self, y, i, loss_fn, target, state, reduction):
        sched, n, batch, _ = state["meta"]
        rows = state["sizes"][i]
        if target is None:
            tc = None
        else:
            if state["t_chunks"] is None:
                tcs = list(torch.chunk(target, n)) if isinstance(target, torch.Tensor) else None
                if tcs is None or len(tcs) != n or target.shape[0] != batch:
                    raise PipelineError(
                        f"{_P}: {self._where()}: target of shape "
                        f"{_fmt_shape(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__} "
                        f"does not split like the batch of {batch} samples into {n} micro-batches")
                state["t_chunks"] = tcs
            tc = state["t_chunks"][i]
            if tc.shape[0] != rows:
                raise PipelineError(f"{_P}: {self._where()}: target micro-batch {i} has {tc.shape[0]} rows, the "
                                    f"input micro-batch {rows}")
            tc = tc.to(y.device)
        try:
            loss = loss_fn(y) if tc is None else loss_fn(y, tc)
        except Exception as e:
            raise PipelineError(f"{_P}: {self._where()}: loss_fn raised on micro-batch {i} (output shape "
                                f"{_fmt_shape(y.shape)}): {type(e).__name__}: {e}") from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PipelineError(f"{_P}: {self._where()}: loss_fn must return a scalar tensor, got "
                                f"{_fmt_shape(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        loss = loss.reshape(())
        if reduction == "mean":
            loss = loss * (rows / batch)
        acc = loss.detach().to(torch.float64)
        state["loss"] = acc if state["loss"] is None else state["loss"] + acc
        return loss

    def _backward(self, y, g, i):
        try:
            torch.autograd.backward(y, g)
        except Exception as e:
            raise PipelineError(f"{_P}: {self._where()}: backward of micro-batch {i} raised: "
                                f"{type(e).__name__}: {e}") from e

    # -- inference -----------------------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor | None = None, chunks: int = 1) -> torch.Tensor | None:
        """Inference: run the pipeline under ``torch.no_grad`` on micro-batches of ``inputs`` (stage 0's).

        Returns the full output (micro-batch outputs concatenated along dimension 0) on the last stage and ``None``
        on the other stages.
        """
        self._check_usable()
        self._step_no += 1
        try:
            _check_chunks(chunks)  # a bad argument aborts the group like any failure (see step)
            with torch.no_grad():
                return self._forward(inputs, chunks)
        except Exception as e:
            self._fail(e)

    def _forward(self, inputs, chunks):
        S, s = self.num_stages, self.stage_index
        sched = _SCHEDULES["forward"]
        meta = None
        if s == 0:
            if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
                raise PipelineError(f"{_P}: {self._where()}: stage 0 needs a non-empty input batch tensor")
            xs = list(torch.chunk(inputs, chunks))
            meta = (sched, len(xs), inputs.shape[0], 0)
            n = len(xs)
        outs = []
        i = 0
        while True:
            if s == 0:
                if i == n:
                    break
                x, rows = xs[i].to(self.device), xs[i].shape[0]
            else:
                if meta is not None and i == meta[1]:
                    break
                x, _, m = self._recv(self.prev_rank, _ACT, i, sched, meta)
                meta = meta or m
                rows = m[3]
            y = self._run_stage(x, i)
            if s == S - 1:
                outs.append(y)
            else:
                self._send(y, self.next_rank, _ACT, i, (meta[0], meta[1], meta[2], rows))
            i += 1
        self._wait_sends()
        if S > 1:
            # the same closing collective as step: a stage that failed (the last one, say, after the others sent
            # everything) aborted the group, so every rank raises instead of returning normally
            ok = torch.ones((), dtype=torch.float64)
            try:
                dist.broadcast(ok, src=global_rank(self.group, S - 1), group=self.group)
            except Exception as e:
                raise _CommFailure(f"in the closing broadcast from the last stage: {e}") from e
        return torch.cat(outs) if s == S - 1 else None


def schedule_ops(schedule: str, num_stages: int, stage: int, n: int) -> list[tuple[str, int]]:
    """The order of forward ("F", i) and backward ("B", i) micro-batch operations of ``stage``.

    ``"gpipe"``: all forwards, then all backwards. ``"1f1b"``: ``min(num_stages - stage - 1, n)`` warm-up forwards,
    then alternately one forward and one backward, then the remaining backwards. Both begin with ("F", 0).
    """
    if schedule == "gpipe":
        return [("F", i) for i in range(n)] + [("B", i) for i in range(n)]
    if schedule != "1f1b":
        raise ValueError(f"{_P}: unknown schedule {schedule!r}")
    warm = min(num_stages - stage - 1, n)
    ops = [("F", i) for i in range(warm)]
    for k in range(n - warm):
        ops += [("F", warm + k), ("B", k)]
    ops += [("B", k) for k in range(n - warm, n)]
    return ops


class _Entry(torch.autograd.Function):
    """Identity on a received activation ``buf`` that turns the buffer itself into a non-leaf (``mark_dirty``, no
    copy) and records the gradient that reaches it in ``holder``."""

    @staticmethod
    def forward(ctx, anchor, buf, holder):
        ctx.holder = holder
        ctx.mark_dirty(buf)
        return buf

    @staticmethod
    def backward(ctx, g):
        ctx.holder.append(g)
        return None, None, None


def _check_chunks(chunks) -> None:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int, got {chunks!r}")


def _shared_across_stages(named, balance, where) -> str | None:
    """A message if a parameter (by identity) is used by layers of two different stages, else None.

    Every rank holds the full model, so every rank finds the same sharing and raises (tied weights across stages,
    e.g. an embedding tied to the output projection on another stage, are not supported: each stage would
    accumulate only its own part of the gradient)."""
    owner: dict[int, tuple[int, str, str]] = {}
    bounds, k = [], 0
    for b in balance:
        bounds.append((k, k + b))
        k += b
    found = []
    for st, (lo, hi) in enumerate(bounds):
        for name, m in named[lo:hi]:
            for pname, p in m.named_parameters():
                prev = owner.setdefault(id(p), (st, name, pname))
                if prev[0] != st:
                    found.append(f"parameter {prev[2]!r} of layer {prev[1]} (stage {prev[0]}) is also parameter "
                                 f"{pname!r} of layer {name} (stage {st})")
    if not found:
        return None
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return (f"{where}: parameters are shared across pipeline stages with balance {balance}: "
            + "; ".join(found[:3]) + more + ". Tied weights across stages are not supported (each stage would get "
            "only part of the gradient); keep the layers that share parameters on one stage (choose balance)")


def _named_to_seq(named: list[tuple[str, nn.Module]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(named))
