"""PNG of plait-bench results: per op, busbw vs message size and latency of the small sizes (matplotlib)."""
from __future__ import annotations

SMALL = 64 << 10  # the latency panel shows sizes up to 64 KiB


def _fmt_bytes(x, _pos=None):
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if x >= 1 << shift:
            v = x / (1 << shift)
            return f"{v:g}{unit}"
    return f"{x:g}"


def plot(path, results, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    ops = list(dict.fromkeys(r["op"] for r in results))
    labels = list(dict.fromkeys(r["backend"] for r in results))
    fig, axes = plt.subplots(len(ops), 2, figsize=(10, 3.6 * len(ops)), squeeze=False)
    for row, op in enumerate(ops):
        bw_ax, lat_ax = axes[row]
        for label in labels:
            pts = sorted((r["bytes"], r["busbw"], r["time_us"]) for r in results
                         if r["op"] == op and r["backend"] == label)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            bw_ax.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=label)
            small = [p for p in pts if p[0] <= SMALL]
            if small:
                lat_ax.plot([p[0] for p in small], [p[2] for p in small], marker="o", ms=3, label=label)
        bw_ax.set_xscale("log", base=2)
        bw_ax.set_yscale("log")
        bw_ax.set_xlabel("message size (bytes)")
        bw_ax.set_ylabel("busbw (GB/s)")
        bw_ax.set_title(f"{op}: bus bandwidth")
        lat_ax.set_xscale("log", base=2)
        lat_ax.set_yscale("log")
        lat_ax.set_xlabel("message size (bytes)")
        lat_ax.set_ylabel("time (us)")
        lat_ax.set_title(f"{op}: latency, sizes <= 64K")
        for ax in (bw_ax, lat_ax):
            ax.xaxis.set_major_formatter(FuncFormatter(_fmt_bytes))
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.12)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"plait-bench: world size {meta['world_size']}, {meta['dtype']}, {meta['device']}, "
                 f"host {meta['host']} ({meta.get('cpus', '?')} cpus), torch {meta['torch_version']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
