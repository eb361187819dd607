"""What `bigbatch plan` prints and draws: the time-to-target table over global batch x GPUs, the
one-line description of a choice, and the plot (`bigbatch.study.plan` makes the rows)."""

from __future__ import annotations

from pathlib import Path


def format_table(rows: list[dict], worlds: list[int]) -> str:
    head = f"{'batch':>7} {'steps':>8} {'examples':>10} " + " ".join(f"{f'{n} GPU':>15}" for n in worlds)
    lines = [head, f"{'':>28} " + " ".join(f"{'time(eff)':>15}" for _ in worlds)]
    by = {(r["global_batch"], r["world_size"]): r for r in rows}
    for b in sorted({r["global_batch"] for r in rows}):
        first = next(r for r in rows if r["global_batch"] == b)
        cells = []
        for n in worlds:
            r = by.get((b, n))
            cells.append(f"{'-':>15}" if r is None else f"{fmt_s(r['time_s']):>9}({r['efficiency']:.2f})")
        lines.append(f"{b:>7} {first['steps']:>8.0f} {first['examples']:>10.3g} " + " ".join(cells))
    return "\n".join(lines)


def fmt_s(s: float) -> str:
    return f"{s:.3g}s" if s < 120 else (f"{s / 60:.3g}m" if s < 7200 else f"{s / 3600:.3g}h")


def describe(row: dict | None) -> str:
    if row is None:
        return "none"
    return (f"global batch {row['global_batch']} on {row['world_size']} GPU(s) ({row['algo']}): {row['steps']:.0f} steps, "
            f"{fmt_s(row['step_s'])} per step -> {fmt_s(row['time_s'])} to target, efficiency {row['efficiency']:.2f}")


def plot_plan(rows: list[dict], plan: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    batches = sorted({r["global_batch"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, b in enumerate(batches):
        mine = sorted((r for r in rows if r["global_batch"] == b), key=lambda r: r["world_size"])
        ax.plot([r["world_size"] for r in mine], [r["time_s"] for r in mine], marker="o", ms=3,
                color=cmap(i / max(len(batches) - 1, 1)), label=f"B={b}")
    for key, marker, label in (("best", "*", "fastest"), ("best_efficient", "s", "fastest at >= 80 % eff.")):
        r = plan.get(key)
        if r:
            ax.plot([r["world_size"]], [r["time_s"]], marker=marker, ms=12, mfc="none", mec="red", ls="none",
                    label=f"{label}: B={r['global_batch']}, {r['world_size']} GPUs")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs (world size)")
    ax.set_ylabel("predicted time to target (s)")
    ax.set_title(f"{plan['config_name']}: B_crit ~ {plan['b_crit']:.0f}, S_min ~ {plan['s_min']:.0f} steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
