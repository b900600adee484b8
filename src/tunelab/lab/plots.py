"""The comparison report's plots, as PNG bytes: score vs forgetting (with the Pareto front), score vs trainable
parameters, score vs wall time (scores with their 95% intervals), every loss curve, and each search's dev
scores by rung."""

from __future__ import annotations

import io

from tunelab.metrics import metric_name


def _png(fig) -> bytes:
    """The figure as PNG bytes (110 dpi), closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _metric_label(rows: list[dict]) -> str:
    return metric_name(next((r["metric"] for r in rows if r["metric"]), None))


def score_plots(rows: list[dict], front: list[str]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    done = [r for r in rows if r["state"] in ("done", "partial") and r["score"] is not None]
    out: dict[str, bytes] = {}

    def scatter(key: str, xlabel: str, title: str, log: float | None = None, mark_front: bool = False):
        """``log``: a symmetric log scale, linear below this value (so that 0 stays on the axis)."""
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        pts = [r for r in done if r[key] is not None]
        for r in pts:
            on = mark_front and r["variant"] in front
            ax.scatter(r[key], r["score"], s=60 if on else 36, c="tab:red" if on else "tab:blue", zorder=3)
            if r["score_lo"] is not None and r["score_hi"] is not None:  # the 95% interval of the score
                err = [[r["score"] - r["score_lo"]], [r["score_hi"] - r["score"]]]
                ax.errorbar(r[key], r["score"], yerr=err, fmt="none", ecolor="grey", lw=1, zorder=2)
            ax.annotate(r["variant"], (r[key], r["score"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if mark_front:
            line = sorted((r[key], r["score"]) for r in pts if r["variant"] in front)
            if line:
                ax.plot(*zip(*line, strict=True), c="tab:red", lw=1, ls="--", label="Pareto front", zorder=2)
                ax.legend(fontsize=8)
        if log:
            ax.set_xscale("symlog", linthresh=log)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"task score: {_metric_label(done)}")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        return _png(fig)

    out["score_vs_forgetting"] = scatter(
        "kl_to_base",
        "forgetting: KL to the base model (log scale; lower is better)",
        "Task score vs forgetting",
        log=0.01,
        mark_front=True,
    )
    out["score_vs_trainable"] = scatter(
        "trainable",
        "trainable parameters (log scale; 0 = trains nothing)",
        "Task score vs trainable parameters",
        log=1,
    )
    out["score_vs_time"] = scatter("wall_time_s", "wall time of the run (s)", "Task score vs wall time")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: a comparison often has 10+ variants
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"], strict=True), label=r["variant"], lw=1.2)
    losses = [v for r in rows for _, v in r["curve"]]
    if losses and min(losses) > 0:  # losses of very different scales (a distillation term beside a task loss)
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)" if ax.get_yscale() == "log" else "training loss")
    ax.set_title("Training loss", fontsize=10)
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=8)
    out["loss_curves"] = _png(fig)
    return out


def search_plot(searches: dict[str, dict]) -> bytes | None:
    """Every candidate's dev score by rung, one panel per searched variant: where each was cut shows."""
    if not searches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    n = len(searches)
    fig, axes = plt.subplots(1, n, figsize=(min(4.2 * n, 12.8), 3.6), squeeze=False)
    for ax, (variant, st) in zip(axes[0], searches.items(), strict=True):
        for i, knobs in enumerate(st.get("candidates", [])):
            pts = [
                (r["budget"], r["scores"][str(i)]["score"])
                for r in st.get("rungs", [])
                if str(i) in r["scores"] and r["scores"][str(i)].get("score") is not None
            ]
            if pts:
                chosen = st.get("chosen") == i
                label = ", ".join(f"{k}={v}" for k, v in knobs.items())
                ax.plot(
                    *zip(*pts, strict=True),
                    marker="o",
                    lw=2.2 if chosen else 1,
                    label=label,
                    alpha=1 if chosen else 0.6,
                )
        ax.set_title(f"search: {variant}", fontsize=9)
        ax.set_xlabel(st.get("unit", "steps"))
        ax.set_ylabel("dev score")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _png(fig)
