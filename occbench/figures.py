"""Plots computed from :mod:`occbench.results` tables (matplotlib, Agg). Each returns the PNG path."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

METRIC_LABELS = {"mpjpe": "MPJPE (mm)", "pa_mpjpe": "PA-MPJPE (mm)", "pckh": "PCKh@0.5 (%)"}


def degradation_bars(summaries: pd.DataFrame, out_png, metric: str = "mpjpe") -> str:
    """Grouped bars: clean vs occluded (the protocol's reported windows) per run, with 95% CIs."""
    rows = summaries[summaries["metric"] == metric]
    runs = list(dict.fromkeys(zip(rows["model"], rows["protocol"])))
    sources = [s for s in ("clean", "occluded", "worst") if s in set(rows["source"])]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(runs) + 1.5), 3.2))
    width = 0.8 / max(len(sources), 1)
    for k, source in enumerate(sources):
        values, errs = [], [[], []]
        for model, protocol in runs:
            row = rows[(rows["model"] == model) & (rows["protocol"] == protocol) & (rows["source"] == source)]
            value = float(row["value"].iloc[0]) if len(row) else np.nan
            low = float(row["ci_low"].iloc[0]) if len(row) else np.nan
            high = float(row["ci_high"].iloc[0]) if len(row) else np.nan
            values.append(value)
            errs[0].append(max(value - low, 0) if np.isfinite(low) else 0)
            errs[1].append(max(high - value, 0) if np.isfinite(high) else 0)
        ax.bar(np.arange(len(runs)) + k * width, values, width, yerr=errs, capsize=3, label=source)
    ax.set_xticks(np.arange(len(runs)) + width * (len(sources) - 1) / 2)
    ax.set_xticklabels([f"{m}\n{p}" for m, p in runs], fontsize=7)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return str(out_png)


def per_joint_bars(per_joint: pd.DataFrame, out_png, title: str = "") -> str:
    """PARE Fig. 6: per-joint error, one bar group per joint, one bar per (model, source) column."""
    value_cols = [c for c in per_joint.columns if c not in ("joint", "joint_name", "model")]
    fig, ax = plt.subplots(figsize=(8.0, 3.0))
    width = 0.8 / max(len(value_cols), 1)
    x = np.arange(len(per_joint))
    for k, col in enumerate(value_cols):
        ax.bar(x + k * width, per_joint[col].to_numpy(dtype=float), width, label=col)
    ax.set_xticks(x + width * (len(value_cols) - 1) / 2)
    ax.set_xticklabels(per_joint["joint_name"], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("MPJPE (mm)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return str(out_png)


def doc_curves(curves: pd.DataFrame, out_png) -> str:
    """HKMR Fig. 6: MPJPE against degree of occlusion, one line per (model, pattern), 95% CI bands."""
    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    for (model, pattern), part in curves.groupby(["model", "pattern"]):
        part = part.sort_values("doc")
        ax.plot(part["doc"], part["mpjpe"], marker="o", label=f"{model}: {pattern}")
        if part["ci_low"].notna().any():
            ax.fill_between(part["doc"], part["ci_low"], part["ci_high"], alpha=0.15)
    ax.set_xlabel("degree of occlusion")
    ax.set_ylabel("MPJPE (mm)")
    ax.set_xticks(range(1, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return str(out_png)
