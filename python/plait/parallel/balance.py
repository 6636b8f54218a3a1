"""Heterogeneous data parallelism: split a global batch across ranks in proportion to their measured speed.

When ranks differ in speed (an old and a new accelerator in one job, a shared host, a throttled device), an equal
split of the global batch makes every step as slow as the slowest rank: the fast ones finish and wait at the
gradient all-reduce. ``Balancer`` measures each rank's own compute throughput (samples per second at the current
model), and every ``rebalance_every`` steps the ranks all-gather those numbers and re-split the global batch in
proportion, so each rank finishes its share at about the same time. For a 2:1 speed ratio the ideal step time is
2/3 of the equal split's (1.5x faster).

Exact gradients with unequal local batches
------------------------------------------
Data parallelism computes the gradient of the *global* mean loss ``(1/N) * sum_i loss_i`` over all ``N`` samples of
the global batch. With rank ``r`` holding ``n_r`` samples (``sum_r n_r = N``), that gradient is

    grad = sum_r (1/N) * sum_{i in r} grad loss_i

so each rank must normalise its loss **by the global count N** (``loss_sum / N``, see ``normalize_loss``) and the
ranks' gradients must be **summed**. DDP's default does something else: each rank takes the mean over its own
``n_r`` samples and DDP's all-reduce then divides the sum by the world size ``W``, giving
``(1/W) * sum_r (1/n_r) * sum_{i in r} grad loss_i``: every rank's samples are weighted ``1/(W n_r)`` instead of
``1/N``. That equals the true gradient only when all ``n_r`` are equal; with a 2:1 split the slow rank's samples
count twice as much as the fast rank's, a biased gradient that no learning-rate change fixes. (Normalising by ``N``
while keeping DDP's average is also wrong: it scales the gradient by ``1/W``.) This module therefore pairs the
global normalisation with a sum:

- ``sum_allreduce_hook`` / ``register_sum_hook``: a DDP communication hook that all-reduces each bucket with SUM and
  does **not** divide by the world size (a registered hook replaces DDP's dividing default);
- ``allreduce_gradients(module, group)``: the same without DDP, summing every parameter's ``.grad`` in coalesced
  buckets.

On a plait group both go through ``plait.all_reduce(..., compression="none")``, so a group configured with lossy
compression cannot silently make them inexact.

Typical loop (no DDP)::

    bal = Balancer(global_batch=384, rebalance_every=10)
    sampler = BalancedSampler(dataset, bal, seed=0)           # this rank's share of each global batch
    for idx in sampler:                                        # (or DataLoader(dataset, batch_sampler=sampler))
        x, y = load(idx)
        opt.zero_grad()
        with bal.measure(len(idx)):                            # local compute only: no communication inside
            loss = normalize_loss(F.cross_entropy(model(x), y, reduction="sum"), bal.global_batch)
            loss.backward()
        allreduce_gradients(model, bal.group)                  # SUM, never divided by the world size
        opt.step()
        bal.step()                                             # collective every rebalance_every steps

With DDP, register the hook and let it tell the balancer when local compute ended, so the time DDP spends waiting
for the all-reduce at the end of ``backward()`` is not counted::

    ddp = DDP(model, process_group=bal.group)
    register_sum_hook(ddp, bal.group, balancer=bal)
    with bal.measure():
        loss = normalize_loss(loss_fn(ddp(x), y, reduction="sum"), bal.global_batch)
        loss.backward()

Every decision (the split) is computed from all-gathered values with the same arithmetic on every rank, and each
rebalance also all-gathers every rank's current split and step number and raises if any rank disagrees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from fractions import Fraction
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from ._groups import resolve_group

__all__ = [
    "split_batch",
    "Balancer",
    "SplitRecord",
    "BalancedSampler",
    "normalize_loss",
    "global_sample_count",
    "SumHookState",
    "sum_allreduce_hook",
    "register_sum_hook",
    "allreduce_gradients",
]

_PREFIX = "plait.parallel.balance"


def _check_int(name: str, v, minimum: int = 0) -> int:
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{_PREFIX}: {name} must be an int, got {type(v).__name__} ({v!r})")
    v = int(v.__index__())
    if v < minimum:
        raise ValueError(f"{_PREFIX}: {name} must be >= {minimum}, got {v}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# The split


def split_batch(global_batch: int, throughputs: Sequence[float], min_per_rank: int = 1) -> list[int]:
    """Split ``global_batch`` samples over ranks in proportion to ``throughputs`` (any positive speeds: samples/s,
    relative weights), with at least ``min_per_rank`` samples each.

    Ideal shares ``q_r = global_batch * t_r / sum(t)``; ranks whose ideal share is below ``min_per_rank`` get exactly
    ``min_per_rank`` and the rest is re-split among the others (repeated until no share is below the floor). The
    remaining shares are rounded by the largest-remainder method: each rank gets ``floor(q_r)``, and the samples left
    over go one each to the ranks with the largest fractional parts, ties to the lower rank. The arithmetic is exact
    (rationals), so the result is a pure function of its inputs: the same on every rank, and it sums exactly to
    ``global_batch``.

    Raises ``TypeError`` / ``ValueError`` for a non-integer or negative batch, an empty list, a throughput that is
    not a finite positive number, or ``global_batch < min_per_rank * len(throughputs)``.
    """
    g = _check_int("split_batch: global_batch", global_batch, 0)
    m = _check_int("split_batch: min_per_rank", min_per_rank, 0)
    try:
        ts = list(throughputs)
    except TypeError:
        raise TypeError(f"{_PREFIX}: split_batch: throughputs must be a sequence of numbers, got "
                        f"{type(throughputs).__name__}") from None
    n = len(ts)
    if n == 0:
        raise ValueError(f"{_PREFIX}: split_batch: throughputs is empty (need one value per rank)")
    fr = []
    for r, t in enumerate(ts):
        if isinstance(t, bool) or not isinstance(t, (int, float)) and not hasattr(t, "__float__"):
            raise TypeError(f"{_PREFIX}: split_batch: throughput of rank {r} is not a number: {t!r}")
        tf = float(t)
        if not math.isfinite(tf) or tf <= 0.0:
            raise ValueError(f"{_PREFIX}: split_batch: throughput of rank {r} must be finite and > 0, got {tf!r} "
                             f"(all: {[float(x) for x in ts]})")
        fr.append(Fraction(tf))
    if g < m * n:
        raise ValueError(f"{_PREFIX}: split_batch: global_batch {g} is too small for {n} ranks with at least "
                         f"{m} sample(s) each (need >= {m * n})")
    fixed: set[int] = set()
    while True:
        free = [r for r in range(n) if r not in fixed]
        rem = g - m * len(fixed)
        total = sum(fr[r] for r in free)
        q = {r: rem * fr[r] / total for r in free}
        low = [r for r in free if q[r] < m]
        if not low:
            break
        fixed.update(low)  # free never empties: sum(q) = rem >= m * len(free)
    counts = [m] * n
    for r in free:
        counts[r] = math.floor(q[r])
    left = g - sum(counts)
    order = sorted(free, key=lambda r: (-(q[r] - math.floor(q[r])), r))
    for r in order[:left]:
        counts[r] += 1
    assert sum(counts) == g and all(c >= m for c in counts), (counts, g, m)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# The balancer


@dataclasses.dataclass(frozen=True)
class SplitRecord:
    """One split the balancer chose: it applies from step ``step`` on (0-based; step 0 is the initial split).
    ``throughputs`` are the per-rank estimates (samples/s) it was computed from (None for the initial split unless
    ``initial_throughputs`` was given)."""

    step: int
    counts: tuple
    throughputs: tuple | None


class Balancer:
    """Splits a global batch of ``global_batch`` samples over the ranks of ``group`` in proportion to their measured
    compute throughput, and re-splits every ``rebalance_every`` steps.

    Arguments:
        global_batch: samples per step over all ranks together (the loss normaliser ``N``).
        group: ``None`` (world), a ProcessGroup, a 1-D DeviceMesh or ``(mesh, dim)``: the data-parallel ranks.
        rebalance_every: ``K``; the ranks all-gather their measurements and re-split after every ``K`` measured steps.
        warmup: the first ``warmup`` steps are not measured (allocator, caches, lazy init); the first rebalance
            happens after step ``warmup + K``.
        smoothing: in ``[0, 1)``: weight of the previous estimate in an exponential moving average of each rank's
            throughput (0: each rebalance uses only the last window's measurements).
        min_per_rank: every rank gets at least this many samples (default 1, so every rank keeps being measured
            and every rank has gradients for every parameter).
        initial_throughputs: optional per-rank speeds to start from (e.g. known from a previous run); default: an
            equal split.
        synchronize: optional callable run before each clock reading in ``measure()`` (e.g.
            ``torch.cuda.synchronize`` for CUDA compute, whose kernels are asynchronous).

    Per step, each rank times its *local compute only* (``with balancer.measure(): forward/backward`` or
    ``balancer.record(n, seconds)``) and then every rank calls ``balancer.step()``. Communication must stay outside
    the measured time: a fast rank that waits for a slow one at an all-reduce would otherwise look slow too, and the
    balancer would never move samples to it. With DDP, ``register_sum_hook(..., balancer=bal)`` marks the end of the
    local backward (the last bucket handed to the all-reduce) and ``measure()`` stops its clock there. (A DDP model
    with buffers and ``broadcast_buffers=True`` also synchronises at the start of each forward; construct it with
    ``broadcast_buffers=False`` or the wait for the slowest rank lands in the measured time.)

    Construction is collective (one small all-gather over the group): every rank must construct its Balancer at
    the same point, and if any rank's arguments are invalid, or ``global_batch``, ``rebalance_every``, ``warmup``,
    ``min_per_rank``, ``smoothing`` or ``initial_throughputs`` differ between ranks, every rank raises
    ``ValueError`` naming the setting and each rank's value.

    The split is a pure function (``split_batch``) of all-gathered numbers, so every rank computes the same one;
    each rebalance also gathers every rank's current split and step count and raises ``RuntimeError`` naming the
    ranks if they differ (a rank that skipped ``step()``).
    """

    def __init__(self, global_batch: int, group=None, rebalance_every: int = 10, warmup: int = 2,
                 smoothing: float = 0.0, min_per_rank: int = 1, initial_throughputs: Sequence[float] | None = None,
                 synchronize: Callable[[], None] | None = None):
        self.group = resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        # Validate locally, but join the settings all-gather even when this rank's arguments are bad, so that every
        # rank raises instead of the good ones hanging in the collective.
        local_err: Exception | None = None
        ts: list[float] | None = None
        try:
            self.global_batch = _check_int("Balancer: global_batch", global_batch, 1)
            self.rebalance_every = _check_int("Balancer: rebalance_every", rebalance_every, 1)
            self.warmup = _check_int("Balancer: warmup", warmup, 0)
            self.min_per_rank = _check_int("Balancer: min_per_rank", min_per_rank, 0)
            if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
                raise ValueError(f"{_PREFIX}: Balancer: smoothing must be a number in [0, 1), got {smoothing!r}")
            self.smoothing = float(smoothing)
            if synchronize is not None and not callable(synchronize):
                raise TypeError(f"{_PREFIX}: Balancer: synchronize must be callable or None")
            if self.global_batch < self.min_per_rank * self.world_size:
                raise ValueError(f"{_PREFIX}: Balancer: global_batch {self.global_batch} is too small for "
                                 f"{self.world_size} ranks with min_per_rank={self.min_per_rank} "
                                 f"(need >= {self.min_per_rank * self.world_size})")
            if initial_throughputs is not None:
                ts = [float(t) for t in initial_throughputs]
                if len(ts) != self.world_size:
                    raise ValueError(f"{_PREFIX}: Balancer: initial_throughputs has {len(ts)} values for a group "
                                     f"of {self.world_size} ranks")
                counts = split_batch(self.global_batch, ts, self.min_per_rank)
            else:
                counts = split_batch(self.global_batch, [1.0] * self.world_size, self.min_per_rank)
        except (TypeError, ValueError) as e:
            local_err = e
        self._check_settings_agree(local_err, ts)
        self._sync = synchronize
        if ts is not None:
            self._est: list[float | None] = list(ts)
            thr = tuple(ts)
        else:
            self._est = [None] * self.world_size
            thr = None
        self._set_counts(counts)
        self.history: list[SplitRecord] = [SplitRecord(0, tuple(counts), thr)]
        self.steps = 0
        self._win_samples = 0
        self._win_seconds = 0.0
        self._win_start = self.warmup
        self._mark: float | None = None
        self._measuring = False

    _SETTINGS = ("global_batch", "rebalance_every", "warmup", "min_per_rank", "smoothing")

    def _gather_rows(self, mine: list[float]) -> list[list[float]]:
        """All-gather one float64 row per rank over the group (on the GPU for NCCL)."""
        t = torch.tensor(mine, dtype=torch.float64)
        backend = dist.get_backend(self.group)
        if isinstance(backend, str) and backend.lower() == "nccl":
            t = t.to(torch.device("cuda", torch.cuda.current_device()))
        gathered = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(gathered, t, group=self.group)
        return [g.cpu().tolist() for g in gathered]

    def _check_settings_agree(self, local_err: Exception | None, ts: list[float] | None) -> None:
        """One all-gather at construction: every rank's settings (and whether its arguments were valid). Raises on
        every rank if any rank's arguments were invalid or any setting differs, naming the setting and the values.
        (A split computed from different settings would make the ranks take overlapping or missing samples.)"""
        n = self.world_size
        if local_err is None:
            row = [1.0] + [float(getattr(self, k)) for k in self._SETTINGS]
            row += [1.0] + list(ts) if ts is not None else [0.0] + [0.0] * n
        else:
            row = [0.0] * (2 + len(self._SETTINGS) + n)
        rows = self._gather_rows(row)
        bad = [r for r in range(n) if rows[r][0] != 1.0]
        if local_err is not None:
            raise local_err
        if bad:
            raise ValueError(f"{_PREFIX}: Balancer: rank(s) {bad} of the group rejected their arguments (see the "
                             f"error on those ranks); this rank ({self.rank}) raises too instead of waiting for them")
        diffs = []
        for i, k in enumerate(self._SETTINGS, start=1):
            vals = [rows[r][i] for r in range(n)]
            if any(v != vals[0] for v in vals):
                shown = [int(v) if k != "smoothing" else v for v in vals]
                diffs.append(f"{k}: " + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)))
        j = 1 + len(self._SETTINGS)
        init = [tuple(rows[r][j + 1:]) if rows[r][j] == 1.0 else None for r in range(n)]
        if any(v != init[0] for v in init):
            diffs.append("initial_throughputs: " + ", ".join(
                f"rank {r}: {None if v is None else list(v)}" for r, v in enumerate(init)))
        if diffs:
            raise ValueError(f"{_PREFIX}: Balancer settings differ across the {n} ranks of the group (seen on rank "
                             f"{self.rank}): " + "; ".join(diffs) + ". Every rank must construct the Balancer with "
                             f"the same settings, or the splits (and the samples each rank takes) would disagree.")

    # -- the current split ---------------------------------------------------------------------------------------
    def _set_counts(self, counts):
        self.counts: tuple = tuple(int(c) for c in counts)
        offs = [0]
        for c in self.counts:
            offs.append(offs[-1] + c)
        self.offsets: tuple = tuple(offs)

    @property
    def local_count(self) -> int:
        """This rank's samples per step under the current split."""
        return self.counts[self.rank]

    @property
    def local_offset(self) -> int:
        """Where this rank's share starts in the global batch."""
        return self.offsets[self.rank]

    @property
    def local_slice(self) -> slice:
        """This rank's contiguous share of a global batch: ``global_x[balancer.local_slice]``."""
        return slice(self.offsets[self.rank], self.offsets[self.rank + 1])

    @property
    def throughputs(self) -> tuple | None:
        """Current per-rank throughput estimates (samples/s), None before the first rebalance."""
        return None if any(e is None for e in self._est) else tuple(self._est)

    def split_for(self, n: int) -> list[int]:
        """A split of ``n`` samples (e.g. a short last batch) in the current proportions, no minimum per rank."""
        n = _check_int("Balancer.split_for: n", n, 0)
        weights = self.throughputs or [max(c, 1e-9) for c in self.counts]
        return split_batch(n, weights, 0)

    # -- measuring -----------------------------------------------------------------------------------------------
    def record(self, n_samples: int, seconds: float) -> None:
        """Record ``n_samples`` computed locally in ``seconds`` (compute only) for the current step. Ignored during
        the warmup steps."""
        n = _check_int("Balancer.record: n_samples", n_samples, 0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise ValueError(f"{_PREFIX}: Balancer.record: seconds must be a finite number >= 0, got {seconds!r} "
                             f"(rank {self.rank})")
        if self.steps < self.warmup:
            return
        self._win_samples += n
        self._win_seconds += float(seconds)

    @contextlib.contextmanager
    def measure(self, n_samples: int | None = None):
        """Time the enclosed local compute and ``record`` it with ``n_samples`` (default: ``local_count``).

        If ``mark_compute_done()`` is called inside the block (``sum_allreduce_hook`` does, for each DDP bucket it
        hands to the all-reduce), the clock stops at the last such mark, so DDP's wait for the all-reduce at the end
        of ``backward()`` is not counted. The block is not recorded if it raises."""
        n = self.local_count if n_samples is None else n_samples
        if self._measuring:
            raise RuntimeError(f"{_PREFIX}: Balancer.measure() blocks cannot nest (rank {self.rank})")
        self._measuring = True
        self._mark = None
        if self._sync is not None:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield self
            if self._sync is not None:
                self._sync()
            t1 = time.perf_counter()
        finally:
            self._measuring = False
        if self._mark is not None and t0 <= self._mark <= t1:
            t1 = self._mark
        self._mark = None
        self.record(n, t1 - t0)

    def mark_compute_done(self) -> None:
        """Called when local compute has ended and communication starts (inside ``measure()``); the latest mark
        ends the measured time. ``sum_allreduce_hook`` calls it when given a balancer."""
        if self._measuring:
            if self._sync is not None:
                self._sync()
            self._mark = time.perf_counter()

    # -- stepping ------------------------------------------------------------------------------------------------
    def due(self) -> bool:
        """Whether the next ``step()`` rebalances (a collective over the group)."""
        s = self.steps + 1
        return s >= self.warmup + self.rebalance_every and (s - self.warmup) % self.rebalance_every == 0

    def step(self) -> bool:
        """End of a training step; every rank of the group must call it. Every ``rebalance_every`` steps (after the
        warmup) it rebalances, a collective; returns True when it did. The new split applies from the next step."""
        rebalance = self.due()
        self.steps += 1
        if rebalance:
            self.rebalance()
        return rebalance

    def rebalance(self) -> tuple:
        """All-gather every rank's measured window (samples, seconds), step count and current split; check that the
        ranks agree; update the throughput estimates and recompute the split. Collective. Returns the new counts."""
        n = self.world_size
        rows = self._gather_rows([float(self._win_samples), self._win_seconds, float(self.steps),
                                  float(self.global_batch)] + [float(c) for c in self.counts])
        ref = rows[0][2:]
        bad = [r for r in range(n) if rows[r][2:] != ref]
        if bad:
            desc = "; ".join(f"rank {r}: step {int(rows[r][2])}, global_batch {int(rows[r][3])}, "
                             f"counts {[int(c) for c in rows[r][4:]]}" for r in range(n))
            raise RuntimeError(f"{_PREFIX}: Balancer ranks disagree at rebalance (seen on rank {self.rank}): {desc}. "
                               f"Every rank must call step() once per step with the same global_batch.")
        missing = []
        for r in range(n):
            samples, seconds = rows[r][0], rows[r][1]
            if samples > 0 and seconds > 0:
                new = samples / seconds
                old = self._est[r]
                self._est[r] = new if old is None else self.smoothing * old + (1.0 - self.smoothing) * new
            elif self._est[r] is None:
                missing.append(r)
        if missing:
            raise RuntimeError(
                f"{_PREFIX}: Balancer.rebalance at step {self.steps}: rank(s) {missing} recorded no compute timing in "
                f"steps {self._win_start}..{self.steps - 1} (counts {list(self.counts)}); wrap each step's local "
                f"compute in balancer.measure() or call balancer.record(n_samples, seconds)")
        counts = split_batch(self.global_batch, self._est, self.min_per_rank)
        self._set_counts(counts)
        self.history.append(SplitRecord(self.steps, tuple(counts), tuple(self._est)))
        self._win_samples = 0
        self._win_seconds = 0.0
        self._win_start = self.steps
        return self.counts

    def __repr__(self):
        return (f"Balancer(rank={self.rank}/{self.world_size}, global_batch={self.global_batch}, counts={self.counts}, "
                f"steps={self.steps}, rebalance_every={self.rebalance_every})")


# ----------------------------------------------------------------------------------------------------------------
# The sampler


class BalancedSampler(torch.utils.data.Sampler):
    """Batch sampler: yields this rank's share (a list of dataset indices) of each global batch.

    Every rank draws the same global order (a permutation seeded by ``seed + epoch``, or ``0..len-1`` without
    shuffling), cuts it into global batches of ``balancer.global_batch`` indices, and takes its contiguous slice
    ``balancer.local_slice`` of each. The counts are read when each batch is produced, so the sampler follows
    rebalancing when it is advanced one batch per step, after ``balancer.step()``: iterate it directly, or use
    ``DataLoader(dataset, batch_sampler=sampler)`` with ``num_workers=0``. (With worker processes the DataLoader
    fetches batch indices several steps ahead, before the split they should follow is known; slice a global
    batch with ``balancer.local_slice`` instead.)

    ``drop_last=True`` (default) drops the final incomplete global batch. With ``drop_last=False`` it is split by
    ``balancer.split_for`` and ``last_global_count`` holds its size: normalise that step's loss by it.
    """

    def __init__(self, data_source, balancer: Balancer, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if isinstance(data_source, int) and not isinstance(data_source, bool):
            self.num_samples = _check_int("BalancedSampler: dataset length", data_source, 0)
        else:
            try:
                self.num_samples = len(data_source)
            except TypeError:
                raise TypeError(f"{_PREFIX}: BalancedSampler needs a sized dataset or a length, got "
                                f"{type(data_source).__name__}") from None
        if not isinstance(balancer, Balancer):
            raise TypeError(f"{_PREFIX}: BalancedSampler: balancer must be a Balancer, got {type(balancer).__name__}")
        self.balancer = balancer
        self.shuffle = bool(shuffle)
        self.seed = _check_int("BalancedSampler: seed", seed, 0)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.last_global_count: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's permutation (call it with the same value on every rank)."""
        self.epoch = _check_int("BalancedSampler.set_epoch: epoch", epoch, 0)

    def global_order(self) -> torch.Tensor:
        """The epoch's global sample order (identical on every rank)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=g)
        return torch.arange(self.num_samples)

    def __len__(self) -> int:
        gb = self.balancer.global_batch
        return self.num_samples // gb if self.drop_last else -(-self.num_samples // gb)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        b = 0
        while True:
            gb = self.balancer.global_batch
            lo = b * gb
            if lo >= self.num_samples:
                return
            chunk = order[lo:lo + gb]
            if len(chunk) < gb:
                if self.drop_last:
                    return
                counts = self.balancer.split_for(len(chunk))
                r = self.balancer.rank
                start = sum(counts[:r])
                self.last_global_count = len(chunk)
                yield chunk[start:start + counts[r]].tolist()
                return
            self.last_global_count = gb
            yield chunk[self.balancer.local_slice].tolist()
            b += 1


# ----------------------------------------------------------------------------------------------------------------
# Exact gradients


def normalize_loss(loss_sum: torch.Tensor, global_count: int | float | torch.Tensor) -> torch.Tensor:
    """``loss_sum / global_count``: this rank's contribution to the global mean loss. ``loss_sum`` is the *sum* of
    the per-sample losses of this rank's share (``reduction="sum"``); ``global_count`` the number of samples (or
    tokens, see ``global_sample_count``) in the whole global batch, on every rank the same. Summing the resulting
    gradients over ranks (``sum_allreduce_hook`` / ``allreduce_gradients``) gives exactly the gradient of the
    full-batch mean loss."""
    if isinstance(global_count, torch.Tensor):
        if global_count.numel() != 1:
            raise ValueError(f"{_PREFIX}: normalize_loss: global_count must be a scalar, got shape "
                             f"{tuple(global_count.shape)}")
        if not bool(global_count > 0):
            raise ValueError(f"{_PREFIX}: normalize_loss: global_count must be > 0, got {global_count.item()}")
        return loss_sum / global_count.to(loss_sum.dtype)
    if isinstance(global_count, bool) or not isinstance(global_count, (int, float)) or not global_count > 0:
        raise ValueError(f"{_PREFIX}: normalize_loss: global_count must be a number > 0, got {global_count!r}")
    return loss_sum / global_count


def global_sample_count(local_count: int, group=None) -> int:
    """Sum of ``local_count`` over the group (one all-reduce): the normaliser when the count is not known in advance
    (e.g. tokens that are not ``ignore_index``)."""
    pg = resolve_group(group)
    n = _check_int("global_sample_count: local_count", int(local_count) if isinstance(local_count, torch.Tensor)
                   else local_count, 0)
    t = torch.tensor([n], dtype=torch.int64)
    if dist.get_backend(pg) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
    return int(t.item())


def _is_plait_group(pg) -> bool:
    try:
        from .._backend import _backend_of
        _backend_of(pg)
        return True
    except Exception:  # noqa: BLE001 - not a plait group (or plait unavailable): use torch.distributed
        return False


def _sum_allreduce(buf: torch.Tensor, pg, plait_group: bool):
    """Asynchronous exact SUM all-reduce of ``buf`` in place; returns the Work."""
    if plait_group:
        from .._backend import all_reduce
        return all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, compression="none", async_op=True)
    return dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=pg, async_op=True)


_NEED_GROUP = ("the hook must all-reduce over the DDP model's own process group, which a hook cannot see: pass "
               "it explicitly (ddp.process_group), or use register_sum_hook(ddp), which does. (An implicit world "
               "group would sum gradients across unrelated ranks, or hang, when DDP runs on a subgroup.)")


class SumHookState:
    """State of ``sum_allreduce_hook``: the process group to all-reduce over, which must be the DDP model's own
    (``ddp.process_group``; a ProcessGroup, 1-D DeviceMesh or ``(mesh, dim)``; ``dist.group.WORLD`` when DDP runs
    on the world), and an optional ``Balancer`` whose ``measure()`` should stop its clock when the backward hands
    its last bucket to the all-reduce. ``group`` is required: ``None`` raises ``ValueError`` (a hook cannot see
    DDP's group, and guessing the world group would be wrong for DDP on a subgroup). ``register_sum_hook(ddp)``
    fills it in from the model."""

    def __init__(self, group=None, balancer: Balancer | None = None):
        if group is None:
            raise ValueError(f"{_PREFIX}: SumHookState: group is None; {_NEED_GROUP}")
        self.process_group = resolve_group(group)
        if balancer is not None and not isinstance(balancer, Balancer):
            raise TypeError(f"{_PREFIX}: SumHookState: balancer must be a Balancer or None, got "
                            f"{type(balancer).__name__}")
        self.balancer = balancer
        self._plait: dict = {}


def sum_allreduce_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce the bucket with SUM and do **not** divide by the world size.

    Use it with a loss normalised by the global sample count (``normalize_loss``): the summed gradients are then
    exactly the full-batch gradient, whatever the per-rank batch sizes. (DDP's built-in hook divides by the world
    size, which is only right when every rank has the same number of samples; see the module docstring.)
    ``state``: a ``SumHookState`` or the DDP model's ProcessGroup; None raises (see ``SumHookState``)."""
    if isinstance(state, SumHookState):
        pg = state.process_group
        if state.balancer is not None:
            state.balancer.mark_compute_done()
        cache = state._plait
    elif state is None:
        raise ValueError(f"{_PREFIX}: sum_allreduce_hook: state is None; {_NEED_GROUP}")
    else:
        pg = state
        cache = {}
    key = id(pg)
    plait_group = cache.get(key)
    if plait_group is None:
        plait_group = cache[key] = _is_plait_group(pg)
    buf = bucket.buffer()
    work = _sum_allreduce(buf, pg, plait_group)
    return work.get_future().then(lambda f: buf)


# DDP checks the hook's annotations at registration; with postponed evaluation they would be strings.
sum_allreduce_hook.__annotations__ = {"state": object, "bucket": dist.GradBucket,
                                      "return": torch.futures.Future[torch.Tensor]}


def register_sum_hook(ddp_model, group=None, balancer: Balancer | None = None) -> SumHookState:
    """``ddp_model.register_comm_hook(SumHookState(group, balancer), sum_allreduce_hook)``; returns the state.
    ``group`` defaults to the DDP model's own process group (``ddp_model.process_group``); an explicit group must
    hold the same ranks, or ``ValueError``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(ddp_model, DDP):
        raise TypeError(f"{_PREFIX}: register_sum_hook needs a DistributedDataParallel model, got "
                        f"{type(ddp_model).__name__}")
    ddp_pg = ddp_model.process_group
    if group is None:
        pg = ddp_pg
    else:
        pg = resolve_group(group)
        mine, theirs = dist.get_process_group_ranks(pg), dist.get_process_group_ranks(ddp_pg)
        if mine != theirs:
            raise ValueError(f"{_PREFIX}: register_sum_hook: group has global ranks {mine} but the DDP model's "
                             f"process group has {theirs}; the hook must all-reduce over DDP's group (omit group)")
    state = SumHookState(pg, balancer)
    ddp_model.register_comm_hook(state, sum_allreduce_hook)
    return state


def allreduce_gradients(module_or_params, group=None, bucket_cap_mb: float = 25.0) -> None:
    """Sum every parameter's ``.grad`` over the group, in place, without dividing by the world size.

    ``module_or_params``: an ``nn.Module`` or an iterable of parameters (the same parameters in the same order on
    every rank). Parameters with ``requires_grad`` take part. A first small all-reduce of a has-gradient mask finds
    the parameters that some rank has a ``.grad`` for: those that no rank touched are skipped and keep
    ``.grad = None`` (as in a single-process run, so optimizers with weight decay or momentum leave them alone); a
    rank missing a gradient that another rank has joins with zeros, so every rank has the same bucket layout. Gradients are flattened into buckets of
    at most ``bucket_cap_mb`` MiB (per dtype and device, in parameter order), all buckets are all-reduced
    asynchronously (on a plait group: ``plait.all_reduce(..., compression="none")``, always exact), then copied back.
    Pair it with a loss normalised by the global sample count (``normalize_loss``)."""
    pg = resolve_group(group)
    if isinstance(module_or_params, torch.nn.Module):
        params: Iterable = module_or_params.parameters()
    else:
        params = module_or_params
    seen, plist = set(), []
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{_PREFIX}: allreduce_gradients: expected parameters, got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            plist.append(p)
    if not plist:
        return
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
        raise ValueError(f"{_PREFIX}: allreduce_gradients: bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
    cap = int(bucket_cap_mb * 1024 * 1024)
    for i, p in enumerate(plist):
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"{_PREFIX}: allreduce_gradients: parameter {i} (shape {tuple(p.shape)}) has a sparse "
                             f"gradient; only dense gradients are supported")
    plait_group = _is_plait_group(pg)
    mask = torch.tensor([p.grad is not None for p in plist], dtype=torch.int32)
    backend = dist.get_backend(pg)
    if isinstance(backend, str) and backend.lower() == "nccl":
        mask = mask.to(torch.device("cuda", torch.cuda.current_device()))
    _sum_allreduce(mask, pg, plait_group).wait()
    touched = mask.cpu().tolist()
    kept = []
    for p, t in zip(plist, touched):
        if t == 0:
            continue  # no rank has a gradient for it: leave .grad None everywhere
        if p.grad is None:
            p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
        kept.append(p)
    plist = kept
    if not plist:
        return
    # buckets: consecutive parameters with the same dtype and device, up to cap bytes each
    buckets: list[list[torch.Tensor]] = []
    cur, cur_key, cur_bytes = [], None, 0
    for p in plist:
        g = p.grad
        key = (g.dtype, g.device)
        nb = g.numel() * g.element_size()
        if cur and (key != cur_key or cur_bytes + nb > cap):
            buckets.append(cur)
            cur, cur_bytes = [], 0
        cur.append(g)
        cur_key = key
        cur_bytes += nb
    if cur:
        buckets.append(cur)
    pending = []
    for grads in buckets:
        if len(grads) == 1 and grads[0].is_contiguous():
            flat = grads[0]
        else:
            flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((grads, flat, _sum_allreduce(flat, pg, plait_group)))
    for grads, flat, work in pending:
        work.wait()
        if len(grads) == 1 and flat is grads[0]:
            continue
        off = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[off:off + n].view_as(g))
            off += n
