"""Run directories as pandas tables: tidy errors, summaries with bootstrap CIs, per-joint tables, DoC curves,
heatmaps, and comparisons across runs that refuse to mix conventions silently.

    import occbench
    run = occbench.load_run("runs/pare-advocc80")
    run.summary()            # clean / occluded / worst-window MPJPE, PA-MPJPE, PCKh with 95% CIs
    run.per_joint()          # PARE Fig. 6, BoPR Table 6
    cmp = occbench.compare_runs([run_a, run_b]); cmp.table; cmp.flags

Window -1 of every run is the clean copy, so degradation is measured inside each run against its own clean
predictions on the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from occbench import rundir
from occbench.data.joints import LSP14_NAMES as JOINT_NAMES
from occbench.errors import UserError
from occbench import metrics, scoring
from occbench.scoring import reported_source, worst_rows
METRICS = ("mpjpe", "pa_mpjpe", "pckh")
AXIS_COLUMNS = ("err_x", "err_y", "err_z")


def bootstrap_ratio(numerators: np.ndarray, denominators: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """Estimate sum(num)/sum(den) and its percentile bootstrap CI, resampling the rows (samples).

    numerators, denominators: (N,) per-sample sums and counts. With den = 1 this is the mean over samples
    (per-sample reduction); with den = visible-joint counts it is the pooled mean (pooled-visible).
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    keep = den > 0
    num, den = num[keep], den[keep]
    if len(num) == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = num.sum() / den.sum()
    if len(num) == 1 or n_boot <= 0:
        return float(estimate), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))
    boots = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    alpha = (1 - level) / 2
    return float(estimate), float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))


@dataclass
class Run:
    """One run directory. Tables load lazily; every table carries model, protocol and dataset columns."""

    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- identity
    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def protocol(self) -> str:
        return self.config["protocol"]["name"]

    @property
    def dataset(self) -> str:
        return self.config["dataset"]["name"]

    @property
    def label(self) -> str:
        return f"{self.model} | {self.protocol} | {self.dataset}"

    @property
    def reduction(self) -> str:
        return self.config["protocol"].get("reduction", "per-sample")

    @property
    def source(self) -> str:
        """Which windows the protocol reports: clean, occluded (all windows) or worst (per sample)."""
        return reported_source(self.config["protocol"])

    def warnings(self) -> list[str]:
        """Reasons these numbers are not comparable to published tables."""
        out = []
        conv = self.config.get("conventions", {})
        if conv.get("body_model_standin"):
            out.append("stand-in body model (not SMPL): numbers are not comparable to published results")
        if self.config["model"].get("weights") == "random":
            out.append("random weights: a smoke run, the numbers mean nothing")
        trained_on = (self.config.get("model_provenance") or {}).get("trained_on")
        if trained_on:
            out.append(f"model trained on {trained_on}: not comparable to published numbers")
        if ((self.config.get("model_provenance") or {}).get("checkpoint_report") or {}).get("partial"):
            out.append("--allow-partial: the checkpoint matched the model only partly; not comparable")
        textures = self.config.get("textures") or {}
        if textures and not textures.get("comparable", True):
            out.append(f"fallback textures ({textures.get('kind')}): not comparable to published AdvOcc numbers")
        if self.config.get("replay"):
            out.append(f"replayed adversarial set from {self.config['replay'].get('model')} (transfer attack)")
        if self.config.get("limit"):
            out.append(f"--limit {self.config['limit']}: a subset of the dataset")
        if self.search_note:
            out.append(self.search_note)
        if conv.get("joint_regressor") == "smpl24-fallback":
            out.append("LSP-14 joints from SMPL's 24 joints (no J_regressor_h36m): not comparable")
        model = self.config["model"]
        if model.get("outside_model"):
            plugin = model.get("plugin") or {}
            origin = (f"plugin {plugin.get('package')} {plugin.get('version')}, " if plugin else "") + \
                f"builder {model.get('builder') or (model.get('wrapper') or {}).get('callable')}"
            outputs = (model.get("wrapper") or {}).get("outputs") or {}
            declared = ", ".join(f"{k}={outputs[k]}" for k in ("form", "rotation", "joints", "camera", "focal_length")
                                 if k in outputs)
            out.append(f"outside model ({origin}; outputs {declared}): not a zoo model; its weights and "
                       "conventions are its author's (recorded in run.json)")
        names = {"pve": "PVE", "sensitivity_meshes": "sensitivity meshes"}
        for what, reason in self.unavailable.items():
            out.append(f"{names.get(what, what)} unavailable: {reason}")
        return out

    @property
    def unavailable(self) -> dict:
        """Mesh-dependent results the model cannot give ('pve', 'sensitivity_meshes') -> the reason (an outside
        model's declared outputs, see occbench.adapters)."""
        return dict(self.config["model"].get("unavailable") or {})

    @property
    def search_note(self) -> str:
        """What the adaptive worst-window search did ('' for the exhaustive search)."""
        search = self.config.get("search")
        if not search:
            return ""
        cost = self.config.get("search_cost") or {}
        spent = (f": {cost['windows_per_sample']:g} of {cost['grid_windows_per_sample']} windows per sample "
                 f"({cost['fewer_forwards']:g}x fewer forwards)" if cost.get("windows_per_sample") else "")
        return (f"adaptive worst-window search (coarse stride {search['coarse_stride']}, top {search['top']}, "
                f"radius {search['radius']}){spent}; a worst window can be missed (then the error is lower "
                "than the exhaustive search's), and 'all windows' covers the searched windows only")

    # ---------------------------------------------------------------- raw tables
    @cached_property
    def joints(self) -> pd.DataFrame:
        """Per (sample, window, joint) rows as the engine wrote them (window -1 = clean)."""
        return pd.read_parquet(rundir.table_path(self.path, "joints"))

    @cached_property
    def samples(self) -> pd.DataFrame:
        return pd.read_parquet(rundir.table_path(self.path, "samples"))

    @cached_property
    def failed(self) -> pd.DataFrame:
        path = rundir.table_path(self.path, "failed")
        return pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["sample_id", "reason"])

    def tidy(self) -> pd.DataFrame:
        """Long form: model, protocol, dataset, sample, window, joint, metric, value (visible joints only)."""
        rows = self.joints[self.joints["visible"]]
        metrics = [m for m in METRICS + AXIS_COLUMNS + ("pve",) if m in rows]
        long = rows.melt(id_vars=["sample_id", "window", "joint"], value_vars=metrics, var_name="metric",
                         value_name="value").rename(columns={"sample_id": "sample"})
        long = long.dropna(subset=["value"])
        long.insert(0, "dataset", self.dataset)
        long.insert(0, "protocol", self.protocol)
        long.insert(0, "model", self.model)
        return long.reset_index(drop=True)

    def _selected(self, source: str, visible_only: bool = True) -> pd.DataFrame:
        rows = self.joints[self.joints["visible"]] if visible_only else self.joints
        window = rows["window"].to_numpy()
        if source == "clean":
            return rows[window < 0]
        if source == "occluded":
            return rows[window >= 0]
        if source == "worst":
            return rows[(window >= 0) & worst_rows(rows, self.samples)]
        raise ValueError(f"source must be clean, occluded or worst, not {source!r}")

    # ---------------------------------------------------------------- summaries
    def metric_estimate(self, metric: str, source: str, reduction: str | None = None, n_boot: int = 1000,
                        seed: int = 0) -> tuple[float, float, float, int]:
        """(value, ci_low, ci_high, n_samples) of ``metric`` over the ``source`` windows.

        mpjpe / pa_mpjpe / pve / axis errors (err_x..z, absolute): ``per-sample`` = mean over joints of each
        (sample, window), mean over windows, mean over samples; ``pooled-visible`` = mean over all visible
        joint instances; the terms come from :func:`occbench.metrics.sample_terms`, exactly as metrics.json.
        pckh: per joint over its visible instances, then the mean over joints, in %. CIs resample samples.
        PVE is one value per (sample, window) (per-sample reduction).
        """
        reduction = "per-sample" if metric == "pve" else (reduction or self.reduction)
        if metric == "pve" and "pve" not in self.joints:
            return float("nan"), float("nan"), float("nan"), 0
        rows = self._selected(source, visible_only=False)
        if rows.empty:
            return float("nan"), float("nan"), float("nan"), 0
        matrices = scoring.error_matrices(rows)
        if metric == "pckh":
            samples, hits, totals = scoring.pckh_counts(matrices)
            keep = totals.sum(axis=1) > 0
            return (*_pckh_bootstrap(hits[keep], totals[keep], n_boot, seed), int(keep.sum()))
        samples, num, den = scoring.sample_terms(matrices, metric, reduction)
        if len(samples) == 0:
            return float("nan"), float("nan"), float("nan"), 0
        return (*bootstrap_ratio(num, den, n_boot, seed), len(samples))

    def summary(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per (source, metric): clean, the protocol's occluded numbers, degradation vs clean."""
        sources = ["clean"] if self.source == "clean" else ["clean", "occluded"] + (
            ["worst"] if self.source == "worst" else [])
        records = []
        for source in sources:
            for metric in METRICS + (("pve",) if self.has_pve else ()):
                value, low, high, n = self.metric_estimate(metric, source, n_boot=n_boot, seed=seed)
                records.append({"model": self.model, "protocol": self.protocol, "dataset": self.dataset,
                                "source": source, "metric": metric, "value": value, "ci_low": low,
                                "ci_high": high, "n_samples": n, "reduction": self.reduction})
        table = pd.DataFrame.from_records(records)
        clean = table[table["source"] == "clean"].set_index("metric")["value"]
        table["delta_vs_clean"] = table["value"] - table["metric"].map(clean)
        table["delta_pct"] = 100.0 * table["delta_vs_clean"] / table["metric"].map(clean)
        return table

    def headline(self) -> dict:
        """The protocol's own numbers (its reported windows and reduction): mpjpe, pa_mpjpe, pckh."""
        return {m: self.metric_estimate(m, self.source, n_boot=0)[0] for m in METRICS}

    def per_joint(self, metric: str = "mpjpe") -> pd.DataFrame:
        """Mean ``metric`` per joint (visible instances) for clean and the protocol's windows (PARE Fig. 6)."""
        out = pd.DataFrame({"joint": range(len(JOINT_NAMES)), "joint_name": JOINT_NAMES})
        for source in dict.fromkeys(["clean", self.source]):
            matrices = scoring.error_matrices(self._selected(source, visible_only=False))
            values, mask = scoring.metric_rows(matrices, metric)
            column = []
            for j in range(len(JOINT_NAMES)):
                _, num, den = metrics.sample_terms(torch.from_numpy(values[:, j:j + 1].astype(np.float64)),
                                                   torch.from_numpy(mask[:, j:j + 1]), reduction="pooled-visible")
                column.append(float(num.sum() / den.sum()) if float(den.sum()) > 0 else float("nan"))
            out[source] = column
        out.insert(0, "model", self.model)
        return out

    def axis_mje(self, source: str | None = None) -> pd.DataFrame:
        """BoPR Table 3: mean absolute error per axis x, y, z (mm) after pelvis alignment, over visible joint
        instances."""
        missing = [c for c in AXIS_COLUMNS if c not in self.joints]
        if missing:
            raise UserError(f"{self.path}: run has no per-axis errors ({', '.join(missing)}); "
                            "re-run it with this occbench version")
        source = source or self.source
        matrices = scoring.error_matrices(self._selected(source, visible_only=False))
        values = {}
        for axis in AXIS_COLUMNS:
            _, num, den = scoring.sample_terms(matrices, axis, "pooled-visible")
            values[axis[-1]] = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
        return pd.DataFrame([{"model": self.model, "protocol": self.protocol, "source": source, **values}])

    def doc_curve(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """HKMR Fig. 6: MPJPE per (pattern, degree of occlusion), per-sample reduction, with 95% CIs."""
        rows = self._selected("occluded", visible_only=False)
        rows = rows[rows["doc"] > 0]
        records = []
        for (pattern, doc), part in rows.groupby(["pattern", "doc"]):
            samples, num, den = scoring.sample_terms(scoring.error_matrices(part.sort_index()), "mpjpe",
                                                     "per-sample")
            value, low, high = bootstrap_ratio(num, den, n_boot, seed)
            records.append({"model": self.model, "pattern": pattern, "doc": int(doc), "mpjpe": value,
                            "ci_low": low, "ci_high": high, "n_samples": len(samples)})
        return pd.DataFrame.from_records(records, columns=["model", "pattern", "doc", "mpjpe", "ci_low",
                                                           "ci_high", "n_samples"])

    # ---------------------------------------------------------------- heatmaps
    @property
    def has_pve(self) -> bool:
        return "pve" in self.joints and bool(self.joints["pve"].notna().any())

    @property
    def has_grid(self) -> bool:
        return self.config["protocol"]["kind"] in ("occsens", "advocc")

    def window_errors(self, sample_id: str | None = None, metric: str = "mpjpe",
                      rise: bool = False) -> pd.DataFrame:
        """(window x joint) errors of one sample, or averaged over samples; columns: window, anchor_x,
        anchor_y, one column per joint name and ``mean`` (the mean over the window's visible joints).

        rise: each row's error minus the same sample's clean error for that joint (window -1) before
        averaging, so a map shows what the occluder adds, not the model's clean error."""
        rows = self._selected("occluded", visible_only=False)
        if sample_id is not None:
            rows = rows[rows["sample_id"] == sample_id]
            if rows.empty:
                raise UserError(f"{self.path}: no windows for sample {sample_id!r}")
        matrices = scoring.error_matrices(rows)
        values, mask = scoring.metric_rows(matrices, metric)
        if rise:
            clean = scoring.error_matrices(self._selected("clean", visible_only=False))
            clean_values, clean_mask = scoring.metric_rows(clean, metric)
            position = pd.Series(np.arange(len(clean["sample_index"])), index=clean["sample_index"])
            at = position.reindex(matrices["sample_index"]).to_numpy()
            known = ~np.isnan(at)
            at = np.where(known, at, 0).astype(np.int64)
            values = values - clean_values[at]
            mask = mask & clean_mask[at] & known[:, None]
        window = matrices["window"]

        def per_window(vals, msk, reduction):
            groups, num, den = metrics.sample_terms(torch.from_numpy(np.ascontiguousarray(vals, np.float64)),
                                                    torch.from_numpy(np.ascontiguousarray(msk)),
                                                    torch.from_numpy(window.astype(np.int64)), reduction)
            return pd.Series((num / den).numpy(), index=groups.numpy())

        # per joint: mean over the window's visible instances; mean: over joints of each (sample, window),
        # then over samples (the per-sample reduction grouped by window)
        table = rows.groupby("window")[["anchor_x", "anchor_y"]].first()
        for j, name in enumerate(JOINT_NAMES):
            table[name] = per_window(values[:, j:j + 1], mask[:, j:j + 1], "pooled-visible")
        table["mean"] = per_window(values, mask, "per-sample")
        return table.reset_index()

    def heatmaps(self, sample_id: str | None = None, metric: str = "mpjpe",
                 rise: bool = False) -> tuple[np.ndarray, list[str]]:
        """(15,224,224) maps (14 joints + mean) for one sample or averaged over the dataset, and titles;
        ``rise``: the error minus the clean error (see :meth:`window_errors`)."""
        from occbench.heatmaps import window_map
        if not self.has_grid:
            raise UserError(f"{self.path}: protocol {self.protocol} has no window grid to draw as a heatmap")
        table = self.window_errors(sample_id, metric, rise)
        indexing = self.config["protocol"].get("indexing", "top-left")
        names = list(JOINT_NAMES) + ["mean"]
        maps = np.stack([window_map(table[name].to_numpy() if name in table else np.full(len(table), np.nan),
                                    table["anchor_x"].to_numpy(), table["anchor_y"].to_numpy(), indexing)
                         for name in names])
        return maps, names


def _pckh_bootstrap(hits: np.ndarray, totals: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """PCKh (%) from per-sample, per-joint counts (S,14) (:func:`occbench.metrics.pckh_counts`): per joint over
    its scored instances, then the mean over joints; the CI resamples samples."""
    def estimate(h, t):
        return 100.0 * float(metrics.pckh_from_counts(torch.from_numpy(h.sum(0)), torch.from_numpy(t.sum(0)))[0])

    if len(hits) == 0:
        return float("nan"), float("nan"), float("nan")
    value = estimate(hits, totals)
    if len(hits) < 2 or n_boot <= 0:
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(hits), size=(n_boot, len(hits)))
    boots = np.array([estimate(hits[i], totals[i]) for i in idx])
    return value, float(np.nanquantile(boots, 0.025)), float(np.nanquantile(boots, 0.975))


def load_run(path) -> Run:
    """Open a finished run directory (``occbench run --out DIR``)."""
    path = Path(path)
    if not rundir.RunDir.exists(path):
        raise UserError(f"{path} is not a run directory (no {rundir.RUN_JSON}); pass the --out folder of "
                        "`occbench run`")
    config = rundir.read_config(path)
    if not rundir.table_path(path, "joints").is_file():
        raise UserError(f"{path}: the run is not finished (no joints.parquet); run the same command again "
                        "to resume it, or `occbench merge` its shards")
    return Run(path=path, config=config, metrics=rundir.read_metrics(path))


# Conventions that must agree before two runs' numbers are put side by side.
COMPARED_CONVENTIONS = ("pelvis", "joint_set", "reduction", "body_model_standin", "joint_regressor")


@dataclass
class Comparison:
    """Several runs side by side. ``flags`` lists every convention difference (never silently mixed)."""

    runs: list
    table: pd.DataFrame
    flags: list

    def to_markdown(self) -> str:
        return _markdown(self.table)

    def to_latex(self) -> str:
        return self.table.to_latex(index=False, float_format="%.1f")


def compare_runs(runs, n_boot: int = 1000, seed: int = 0) -> Comparison:
    """Summaries of several runs in one table (one row per run: clean and protocol numbers with CIs)."""
    runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
    flags = []
    for key in COMPARED_CONVENTIONS:
        values = {r.label: (r.config.get("conventions") or {}).get(key) for r in runs}
        if len(set(map(json.dumps, values.values()))) > 1:
            flags.append(f"convention '{key}' differs: " + "; ".join(f"{k}: {v}" for k, v in values.items()))
    for (a, b) in zip(runs, runs[1:]):
        if a.dataset != b.dataset:
            flags.append(f"datasets differ: {a.label} vs {b.label}")
        if a.config["protocol"] != b.config["protocol"]:
            flags.append(f"protocols differ: {a.label} vs {b.label}")
        if a.config.get("limit") != b.config.get("limit") or a.config.get("n_samples") != b.config.get("n_samples"):
            flags.append(f"sample sets differ: {a.label} ({a.config.get('n_samples')} samples) vs "
                         f"{b.label} ({b.config.get('n_samples')} samples)")
        if bool(a.config.get("search")) != bool(b.config.get("search")):
            adaptive, exhaustive = (a, b) if a.config.get("search") else (b, a)
            flags.append(f"worst windows searched differently: {adaptive.label} adaptive (may miss the worst "
                         f"window), {exhaustive.label} exhaustive")
        if bool(a.config.get("replay")) != bool(b.config.get("replay")):
            flags.append(f"one run replays another model's adversarial set: {a.label} vs {b.label}")
    records = []
    for run in runs:
        summary = run.summary(n_boot=n_boot, seed=seed)
        record = {"model": run.model, "protocol": run.protocol, "dataset": run.dataset,
                  "weights": run.config["model"].get("weights")}
        for _, row in summary.iterrows():
            if row["source"] not in ("clean", run.source):
                continue
            name = f"{row['metric']} ({'clean' if row['source'] == 'clean' else run.protocol})"
            record[name] = row["value"]
            record[name + " 95% CI"] = f"{row['ci_low']:.1f}-{row['ci_high']:.1f}"
        records.append(record)
    return Comparison(runs=runs, table=pd.DataFrame.from_records(records), flags=list(dict.fromkeys(flags)))


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        cells = [f"{v:.1f}" if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
