"""The training curves a person would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from pace_llm.files import read_rows


def plot_metrics(metrics_jsonl: Path, png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics_jsonl)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    # The consistency term is unscaled by λ and can be orders of magnitude off the task loss
    # (a vocabulary-wide sum): on one axis it would flatten the task and held-out curves, so it gets its own.
    panels = [
        ("loss", ["loss", "task_loss", "eval_loss"]),
        ("PACE consistency", ["consistency_loss"]),
        ("grad norm", ["grad_norm"]),
        ("FP-distance", ["fp_distance"]),
    ]
    panels = [(title, [k for k in keys if any(r.get(k) is not None for r in rows)]) for title, keys in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
            ax.plot(*zip(*pts), label=key, marker="o" if key == "eval_loss" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
