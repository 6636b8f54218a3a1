"""Activation recomputation that does not repeat forward collectives, and a saved-activation meter.

``checkpoint(fn, *args)`` runs ``fn`` under ``torch.utils.checkpoint`` (non-reentrant): the tensors autograd would
save inside ``fn`` are dropped after the forward and recomputed in backward. A plain checkpoint of a tensor-parallel
region re-runs its forward all-reduces / all-gathers / reduce-scatters during the recomputation: extra communication,
and, worse, a collective that every rank of the group must join in the same order while each rank's autograd engine
decides on its own when to recompute. Here every forward collective of ``plait.parallel`` (the mappings, the layers,
the vocab-parallel embedding and cross-entropy) records its result on the first run, and the recomputation replays
the recorded results instead of communicating. The recorded results are kept until the backward of the region has
run (they are the only activations kept besides the region's inputs); ``replay_bytes`` reports their size.

A collective issued directly with ``torch.distributed`` inside ``fn`` is not recorded and would run again in the
recomputation; write the region with ``plait.parallel`` mappings.

``SavedTensorMeter`` counts the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``,
device independent), each storage once.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from . import mappings as _m

__all__ = ["checkpoint", "SavedTensorMeter", "ReplayCache"]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)


class ReplayCache:
    """The forward collectives' results of one checkpointed region, in issue order."""

    def __init__(self, region: str = "checkpoint"):
        self.region = region
        self.entries: list[tuple[str, object]] = []
        self.recording = True
        self.pos = 0

    def collective(self, name, fn, args):
        if self.recording:
            out = fn(*args)
            # A private copy: the region may modify the result in place (h += x), and the replay must see the value
            # the collective produced, not the modified one.
            self.entries.append((name, _copy(out)))
            return out
        if self.pos >= len(self.entries):
            raise RuntimeError(
                f"plait.parallel.checkpoint ({self.region}): the recomputation issued collective #{self.pos} "
                f"({name}), but the first forward issued only {len(self.entries)}; the region is not deterministic")
        rec_name, out = self.entries[self.pos]
        if rec_name != name:
            raise RuntimeError(
                f"plait.parallel.checkpoint ({self.region}): the recomputation's collective #{self.pos} is {name}, "
                f"the first forward's was {rec_name}; the region is not deterministic")
        self.pos += 1
        return _copy(out)  # the recomputation may modify it in place too (and may run more than once)

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for _, out in self.entries:
            for t in _tensors(out):
                key = (t.untyped_storage().data_ptr(), t.device)
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total


def _copy(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_copy(o) for o in out)
    return out


@contextlib.contextmanager
def _active(cache):
    prev = getattr(_m._REPLAY, "cache", None)
    _m._REPLAY.cache = cache
    try:
        yield
    finally:
        _m._REPLAY.cache = prev


# Weak references to the live regions' caches (for measurement). A cache lives as long as the autograd graph of
# its region (the checkpoint's recomputation closure holds it), so training does not accumulate them.
_LIVE: list = []


def replay_bytes() -> int:
    """Bytes held now by the replay caches of live checkpointed regions (created since ``reset_replay_stats()``)."""
    caches = [r() for r in _LIVE]
    return sum(c.nbytes for c in caches if c is not None)


def reset_replay_stats() -> None:
    _LIVE.clear()


def checkpoint(fn, *args, region: str | None = None, **kwargs):
    """``fn(*args, **kwargs)`` with its activations recomputed in backward and its forward collectives replayed,
    not repeated (see the module docstring). Returns ``fn``'s result. Inside an already checkpointed region (or
    with autograd disabled) it just calls ``fn``."""
    if not torch.is_grad_enabled() or getattr(_m._REPLAY, "cache", None) is not None:
        return fn(*args, **kwargs)
    cache = ReplayCache(region or getattr(fn, "__qualname__", "checkpoint"))
    _LIVE.append(weakref.ref(cache))
    if len(_LIVE) > 1024:
        _LIVE[:] = [r for r in _LIVE if r() is not None]

    def run(*a):
        with _active(cache):
            try:
                return fn(*a, **kwargs)
            finally:
                # The first run recorded; from now on (autograd's recomputation) the results are replayed.
                cache.recording = False
                cache.pos = 0

    return _torch_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


class SavedTensorMeter:
    """Context manager that counts the bytes autograd saves for backward while it is active (each storage once).

    ``with SavedTensorMeter() as m: loss = model(x)`` then ``m.nbytes``. Tensors saved inside a checkpointed region
    are not saved (that is the point), so they do not count; add ``replay_bytes()`` and the region inputs for the
    full picture.
    """

    def __init__(self, exclude=()):
        """``exclude``: tensors whose storage is not counted (pass ``model.parameters()`` to count activations
        only: autograd also saves the weights a matmul needs, which exist anyway)."""
        self.nbytes = 0
        self._excluded = {(t.untyped_storage().data_ptr(), t.device) for t in exclude}
        self._seen = set()
        self._ctx = None

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
