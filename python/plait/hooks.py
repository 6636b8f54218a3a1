"""DDP communication hooks: block-quantized gradient all-reduce with error feedback.

    state = plait.hooks.CompressionState(compression="int8", error_feedback=True, start_iter=10, min_bytes=64 << 10)
    model.register_comm_hook(state, plait.hooks.compressed_allreduce_hook)

Each bucket is divided by the world size (DDP averages gradients) and all-reduced with plait's compressed all-reduce
(the codec runs inside the transport: no quantized copy of the bucket is made). With ``error_feedback`` the part of
this rank's contribution that quantization dropped is kept and added to the next step's gradient (EF-SGD), so the
error does not accumulate into the model (for float32 buckets the engine computes the new residual from the very bytes
it encodes, segment by segment; bfloat16 / float16 buckets replay the encoding here). Residuals are kept per bucket and keyed by the parameters the bucket holds:
when DDP rebuilds its buckets after the first iteration, each parameter's residual moves to its new bucket. Steps
taken under ``no_sync()`` do not call the hook; the accumulated gradient is compressed at the next synchronizing
step. ``state_dict()`` / ``load_state_dict()`` save and restore the residuals and the step counter, so a
checkpointed run resumes identically.

During the first ``start_iter`` steps, and for buckets smaller than ``min_bytes`` or of a dtype the codecs do not
take, the bucket goes out in full precision. On a group whose backend is not plait (e.g. gloo) the hook runs the
uncompressed all-reduce and warns once. With the hierarchical compressed schedule (several hosts with several ranks
each) what is quantized is a host's partial sum, so error feedback is off there (with a warning).
"""

import warnings

import torch
import torch.distributed as dist

from . import _C

_CODECS = ("none", "int8", "int4", "fp8", "bf16")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_DEFAULT_BLOCK = {"int8": 256, "int4": 32, "fp8": 256, "bf16": 256}  # kernels/codec.h defaultBlock


class CompressionState:
    """State of :func:`compressed_allreduce_hook` (see the module docstring)."""

    def __init__(self, compression: str = "int8", error_feedback: bool = True, start_iter: int = 10,
                 min_bytes: int = 64 << 10, process_group=None, block: int = 0):
        if compression not in _CODECS:
            raise ValueError(f"plait.hooks.CompressionState: compression must be one of {_CODECS}, got {compression!r}")
        if start_iter < 0 or min_bytes < 0:
            raise ValueError("plait.hooks.CompressionState: start_iter and min_bytes must be >= 0")
        self.compression = compression
        self.error_feedback = bool(error_feedback)
        self.start_iter = int(start_iter)
        self.min_bytes = int(min_bytes)
        self.process_group = process_group
        self.block = int(block)
        self.iter = 0
        # bucket key (tuple of parameter keys) -> flat float32 residual; parameter key -> (bucket key, offset, numel)
        self._residuals: dict[tuple, torch.Tensor] = {}
        self._where: dict[int, tuple] = {}
        self._keys: dict[int, int] = {}  # id(param) -> its key: the order DDP first hands the parameters to the hook
        self._pending: dict[int, torch.Tensor] = {}  # residuals loaded from a state_dict, not yet placed
        self._warned = False

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        per_param = {}
        for pkey, (bkey, off, n) in self._where.items():
            per_param[pkey] = self._residuals[bkey][off:off + n].clone()
        per_param.update({k: v.clone() for k, v in self._pending.items()})
        return {"compression": self.compression, "error_feedback": self.error_feedback,
                "start_iter": self.start_iter, "min_bytes": self.min_bytes, "block": self.block, "iter": self.iter,
                "residuals": per_param}

    def load_state_dict(self, state: dict) -> None:
        self.compression = state["compression"]
        self.error_feedback = state["error_feedback"]
        self.start_iter = state["start_iter"]
        self.min_bytes = state["min_bytes"]
        self.block = state.get("block", 0)
        self.iter = state["iter"]
        self._residuals.clear()
        self._where.clear()
        self._pending = {int(k): v.detach().to(torch.float32).clone() for k, v in state["residuals"].items()}

    # ---- residual bookkeeping ----
    def _pkey(self, p: torch.Tensor) -> int:
        return self._keys.setdefault(id(p), len(self._keys))

    def _residual(self, params, numel: int) -> torch.Tensor:
        keys = tuple(self._pkey(p) for p in params)
        r = self._residuals.get(keys)
        if r is not None and r.numel() == numel:
            return r
        # A new bucket (first step, or DDP rebuilt its buckets): gather each parameter's residual from wherever it
        # was, or from a loaded state_dict; new parameters start at zero.
        r = torch.zeros(numel, dtype=torch.float32)
        off = 0
        emptied = set()
        for p, k in zip(params, keys):
            n = p.numel()
            if k in self._where:
                bkey, o, m = self._where.pop(k)
                if m == n:
                    r[off:off + n].copy_(self._residuals[bkey][o:o + m])
                emptied.add(bkey)
            elif k in self._pending:
                src = self._pending.pop(k)
                if src.numel() == n:
                    r[off:off + n].copy_(src.view(-1))
            self._where[k] = (keys, off, n)
            off += n
        for bkey in emptied:
            if bkey != keys and not any(w[0] == bkey for w in self._where.values()):
                self._residuals.pop(bkey, None)
        self._residuals[keys] = r
        return r


def _block_ranges(count: int, n: int, block: int):
    """The owner ranges of plait's direct compressed schedule (algo/compressed.cc: whole codec blocks, even)."""
    blocks = (count + block - 1) // block
    base, extra = divmod(blocks, n)
    out, b = [], 0
    for i in range(n):
        nb = base + (1 if i < extra else 0)
        lo, hi = min(count, b * block), min(count, (b + nb) * block)
        out.append((lo, hi))
        b += nb
    return out


def _is_plait(group) -> bool:
    try:
        from ._backend import _backend_of
        _backend_of(group)
        return True
    except Exception:  # noqa: BLE001
        return False


def compressed_allreduce_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged across ranks, block-quantized on the wire (see module doc)."""
    from ._backend import _backend_of, all_reduce

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    last = bucket.is_last()
    nbytes = buf.numel() * buf.element_size()
    compress = (state.compression != "none" and state.iter >= state.start_iter and nbytes >= state.min_bytes
                and buf.dtype in _FLOATS and buf.device.type == "cpu")
    plait_group = _is_plait(group)
    if compress and not plait_group:
        if not state._warned:
            warnings.warn("plait.hooks.compressed_allreduce_hook: the group's backend is not plait; buckets go out "
                          "uncompressed", stacklevel=2)
            state._warned = True
        compress = False
    # Keys follow the order the hook first sees the parameters, on every call (compressed or not), so a run and its
    # resumption from a checkpoint number them the same (both start with DDP's initial bucket layout).
    params = bucket.parameters()
    for p in params:
        state._pkey(p)
    if last:
        state.iter += 1
    buf.div_(world)
    if not compress:
        if plait_group:
            work = all_reduce(buf, group=group, compression="none", async_op=True)
        else:
            work = dist.all_reduce(buf, group=group, async_op=True)
        return work.get_future().then(lambda f: buf)
    codec = state.compression
    backend = _backend_of(group)
    block = backend.compression_block or 0
    if state.block and state.block != (block or _DEFAULT_BLOCK[codec]):
        raise ValueError(f"plait.hooks: CompressionState(block={state.block}) differs from the group's compression "
                         f"block ({block or _DEFAULT_BLOCK[codec]}); set plait.Options(compression_block=...) instead")
    ef = state.error_feedback
    if ef and backend.plan_compression(buf.numel(), str(buf.dtype).replace("torch.", ""), codec)[2]:
        # Hierarchical schedule: what is quantized is a host's partial sum, not this rank's gradient; the residual
        # cannot be computed here, so error feedback is off for this group (once-only warning).
        if not state._warned:
            warnings.warn("plait.hooks.compressed_allreduce_hook: error feedback is not available with the "
                          "hierarchical compressed schedule (several ranks per host on several hosts); running "
                          "without it", stacklevel=2)
            state._warned = True
        ef = False
    if ef:
        r = state._residual(params, buf.numel())
        if buf.dtype == torch.float32:
            # The engine computes the new residual from the bytes it sends (no second encode here).
            buf.add_(r)
            return backend._all_reduce_ef(buf, r, codec).get_future().then(lambda f: buf)
        r.add_(buf.float())      # the compensated gradient, in float32
        buf.copy_(r)             # what is sent (rounded to the bucket's dtype)
        # New residual: what this rank's quantization drops. plait quantizes this rank's contribution to every range
        # but its own (direct schedule), range by range from the range's start: the same blocks here.
        r.neg_()
        rank = dist.get_rank(group)
        for j, (lo, hi) in enumerate(_block_ranges(buf.numel(), world, block or _DEFAULT_BLOCK[codec])):
            if hi <= lo:
                continue
            if j == rank:
                r[lo:hi].zero_()
                continue
            enc = _C.codec_encode(codec, block, buf[lo:hi])
            _C.codec_decode_accumulate(codec, block, enc, r[lo:hi])
            r[lo:hi].neg_()
    work = all_reduce(buf, group=group, compression=codec, async_op=True)
    return work.get_future().then(lambda f: buf)
