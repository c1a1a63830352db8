"""``occbench report``: run directories -> one self-contained ``index.html`` (opens offline from a file URL).

Everything shown is computed by :mod:`occbench.results` / :mod:`occbench.sensmesh` (testable), then drawn.
Images are embedded as data URIs; sensitivity meshes are also written beside the page as PLY and GLB.
"""
from __future__ import annotations

import base64
import functools
import html
import json
import time
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from occbench import figures, rundir
from occbench.data.joints import LSP14_NAMES
from occbench.heatmaps import color_range
from occbench.results import Run, compare_runs, load_run

def write_report(run_dirs, out_dir, title: str = "occbench report", heatmap_samples: int = 3,
                 meshes: bool = True, smpl_dir=None, data_dir=None) -> Path:
    """Write ``out_dir/index.html`` for the given runs and return its path. smpl_dir / data_dir: the body
    model the sensitivity meshes are posed with (as ``load_body_model``; use the runs' own)."""
    out_dir = Path(out_dir)
    (out_dir / "meshes").mkdir(parents=True, exist_ok=True)
    runs = [r if isinstance(r, Run) else load_run(r) for r in run_dirs]
    page = _Page(title)
    page.warnings(runs)
    summaries = pd.concat([r.summary() for r in runs], ignore_index=True)

    page.h2("Summary", "summary")
    page.p("Each protocol's numbers next to the same model's clean numbers on the same samples "
           "(window -1 of every run). 95% confidence intervals are percentile bootstraps over samples.")
    for (protocol, dataset), part in summaries.groupby(["protocol", "dataset"], sort=False):
        page.h3(f"{protocol} on {dataset}")
        page.table(_summary_table(part), cls="summary")

    groups = _comparable_groups(runs)
    if any(len(g) > 1 for g in groups.values()):
        page.h2("Comparison across models", "comparison")
        for (protocol, dataset), members in groups.items():
            if len(members) < 2:
                continue
            comparison = compare_runs(members)
            page.h3(f"{protocol} on {dataset}")
            for flag in comparison.flags:
                page.alert(flag)
            page.table(comparison.table, cls="comparison")

    page.h2("Degradation under occlusion", "degradation")
    for metric in ("mpjpe", "pa_mpjpe", "pckh"):
        png = figures.degradation_bars(summaries, out_dir / f"degradation_{metric}.png", metric)
        page.image(png, f"{metric}: clean vs occluded")

    page.h2("Per-joint errors", "per-joint")
    page.p("Mean error per joint over visible joint instances (PARE Fig. 6, BoPR Table 6).")
    for i, run in enumerate(runs):
        table = run.per_joint()
        png = figures.per_joint_bars(table, out_dir / f"per_joint_{i}.png", run.label)
        page.image(png, run.label)
        page.table(table.drop(columns=["joint"]), cls="perjoint")
        if "err_x" in run.joints:
            page.table(run.axis_mje(), cls="axis")

    curves = [r.doc_curve() for r in runs if r.config["protocol"]["kind"] == "hkmr"]
    if curves:
        page.h2("Error vs degree of occlusion", "doc")
        table = pd.concat(curves, ignore_index=True)
        page.image(figures.doc_curves(table, out_dir / "doc_curves.png"), "HKMR Fig. 6 style")
        page.table(table, cls="doc")

    grid_runs = [r for r in runs if r.has_grid]
    if grid_runs:
        _heatmap_section(page, grid_runs, out_dir, heatmap_samples)
        if meshes:
            _mesh_section(page, grid_runs, out_dir, smpl_dir, data_dir)

    page.h2("How each run was made", "provenance")
    for run in runs:
        page.h3(run.label)
        page.pre(json.dumps(_provenance(run), indent=2, default=str))
    index = out_dir / "index.html"
    index.write_text(page.render())
    return index


# ---------------------------------------------------------------------------------------- sections
def _summary_table(part: pd.DataFrame) -> pd.DataFrame:
    table = part[["model", "source", "metric", "value", "ci_low", "ci_high", "delta_vs_clean", "delta_pct",
                  "n_samples", "reduction"]].copy()
    table["95% CI"] = [f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(table.pop("ci_low"), table.pop("ci_high"))]
    return table


def _comparable_groups(runs) -> dict:
    groups: dict = {}
    for run in runs:
        groups.setdefault((run.protocol, run.dataset), []).append(run)
    return groups


@functools.lru_cache(maxsize=4)
def _open_dataset(name: str):
    """Each dataset opened once per report (opening the demo set checks its cache: seconds)."""
    from occbench.data import open_dataset
    return open_dataset(name)


def _crop_lookup(run: Run):
    """sample_index -> crop (224,224,3) from the run's dataset, or None when the dataset is unavailable."""
    try:
        dataset = _open_dataset(run.dataset)
    except Exception as err:  # the report must still work without the images
        warnings.warn(f"{run.label}: dataset images unavailable ({err}); heatmaps drawn on gray")
        return lambda index: None
    return lambda index: dataset[int(index)].crop


HEATMAP_PERCENTILES = (1.0, 99.0)   # colour range of each kind of map: a few extreme windows saturate


def _heatmap_section(page, runs, out_dir, n_samples):
    page.h2("Occlusion sensitivity heatmaps", "heatmaps")
    page.p("Each panel: the error of one joint (and the mean over joints) when the occluder is placed at that "
           "position (PARE Fig. 2). 'Rise' maps show the error minus the same sample's clean error, so they show "
           "what the occluder costs rather than the model's clean error. Colour ranges are set per protocol and "
           "per kind of map (dataset average or single sample, error or rise), from the 1st to the 99th "
           "percentile of the values of every model on this page, so models stay comparable; values beyond "
           "the range take the end colours. Uncoloured cells: the joint lies under the occluder there and the "
           "protocol does not score it (visible-joint masking, AdvOcc).")
    figure = 0
    for protocol, (members, maps, ranges) in heatmap_panels(runs, n_samples).items():
        page.h3(f"{protocol}: colour ranges shared by every model")
        page.p("; ".join(f"{KIND_LABELS[kind]} {low:.0f} to {high:.0f} mm" for kind, (low, high) in ranges.items()))
        for run, run_maps in zip(members, maps):
            figure = _draw_run_heatmaps(page, run, run_maps, ranges, out_dir, figure)


def heatmap_panels(runs, n_samples: int) -> dict:
    """protocol -> (its runs, each run's maps (:func:`_run_heatmaps`), {kind: (vmin, vmax)}): one colour
    range per protocol and kind of map, shared by every model of that protocol."""
    by_protocol: dict = {}
    for run in runs:
        by_protocol.setdefault(run.protocol, []).append(run)
    out = {}
    for protocol, members in by_protocol.items():
        maps = [_run_heatmaps(run, n_samples) for run in members]
        ranges = {kind: color_range([m for run_maps in maps for m in run_maps[kind]], *HEATMAP_PERCENTILES)
                  for kind in KIND_LABELS}
        out[protocol] = (members, maps, ranges)
    return out


KIND_LABELS = {"mean_rise": "dataset average, rise over clean:", "mean_error": "dataset average, error:",
               "sample_rise": "single samples, rise over clean:", "sample_error": "single samples, error:"}


def _run_heatmaps(run, n_samples) -> dict:
    """The maps of one run: dataset averages and the ``n_samples`` samples with the highest mean error."""
    picked = run.samples.sort_values("mean_mpjpe", ascending=False)["sample_id"].head(n_samples).tolist()
    mean_error, titles = run.heatmaps()
    return {"titles": titles, "picked": picked, "mean_error": [mean_error], "mean_rise": [run.heatmaps(rise=True)[0]],
            "sample_error": [run.heatmaps(sid)[0] for sid in picked],
            "sample_rise": [run.heatmaps(sid, rise=True)[0] for sid in picked]}


def _draw_run_heatmaps(page, run, maps, ranges, out_dir, figure) -> int:
    from occbench.heatmaps import ERROR_CMAP, RISE_CMAP, plot_heatmap_grid
    page.h3(run.label)
    crops = _crop_lookup(run)
    gray = np.full((224, 224, 3), 128, np.uint8)
    index_of = dict(zip(run.samples["sample_id"], run.samples["sample_index"]))
    first = run.samples["sample_index"].iloc[0] if len(run.samples) else 0
    panels = [("mean_rise", 0, first, f"{run.label}: rise over clean, averaged over {len(run.samples)} samples",
               "rise over the clean error, averaged over the dataset (drawn over the first sample)"),
              ("mean_error", 0, first, f"{run.label}: error, averaged over {len(run.samples)} samples",
               "error averaged over the dataset (drawn over the first sample)")]
    for k, sid in enumerate(maps["picked"]):
        panels += [("sample_rise", k, index_of[sid], f"{run.label}: {sid}, rise over clean",
                    f"sample {sid}: rise over its clean error"),
                   ("sample_error", k, index_of[sid], f"{run.label}: {sid}, error", f"sample {sid}: error")]
    for kind, k, sample_index, suptitle, caption in panels:
        crop = crops(sample_index)
        rise = kind.endswith("rise")
        png = plot_heatmap_grid(crop if crop is not None else gray, maps[kind][k], maps["titles"], *ranges[kind],
                                out_dir / f"heatmap_{figure}.png", suptitle=suptitle,
                                cmap=RISE_CMAP if rise else ERROR_CMAP,
                                label="rise over clean error (mm)" if rise else "joint error (mm)")
        page.image(png, caption)
        figure += 1
    return figure


def _mesh_section(page, runs, out_dir, smpl_dir=None, data_dir=None):
    from occbench.body import load_body_model
    from occbench.sensmesh import accumulate_run, export_mesh, render_views
    import torch

    if all("sensitivity_meshes" in run.unavailable for run in runs):
        return      # the warnings at the top of the page say why (e.g. a joints-only outside model)
    page.h2("Occlusion sensitivity meshes", "meshes")
    page.p("Per-vertex mean error when an occluder covers that vertex, pooled over the dataset and shown on the "
           "template body (method: README, 'Occlusion sensitivity meshes'). Drag the 3D view to rotate it; "
           "PLY/GLB files carry the per-vertex values (error_mm) and colours.")
    body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir)
    with torch.inference_mode():
        template = body(rotmat=torch.eye(3).expand(1, 24, 3, 3).contiguous(),
                        betas=torch.zeros(1, 10)).vertices[0].numpy()
    pooled = []
    for run in runs:
        if "sensitivity_meshes" in run.unavailable:
            page.alert(f"{run.label}: no sensitivity mesh: {run.unavailable['sensitivity_meshes']}")
            continue
        predictions_path = rundir.table_path(run.path, "predictions")
        if not predictions_path.is_file():
            page.alert(f"{run.label}: no clean predictions stored (predictions.parquet); no sensitivity mesh")
            continue
        acc = accumulate_run(run, body, pd.read_parquet(predictions_path), LSP14_NAMES)
        pooled.append((run, acc.mean()))
    if not pooled:
        return
    vmin, vmax = _shared_range([v[:, -1] for _, v in pooled])
    joint_min, joint_max = _shared_range([v[:, :-1] for _, v in pooled])
    viewer_js = resources.files("occbench").joinpath("assets/meshviewer.js").read_text()
    page.script(viewer_js)
    page.p(f"Colour range of every mean mesh on this page: {vmin:.0f}-{vmax:.0f} mm; of every per-joint mesh "
           f"file: {joint_min:.0f}-{joint_max:.0f} mm (1st-99th percentiles over all models).")
    for i, (run, values) in enumerate(pooled):
        page.h3(run.label)
        mean_values = values[:, -1]
        stem = out_dir / "meshes" / f"sensitivity_{i}_mean"
        files = export_mesh(template, body.faces, mean_values, vmin, vmax, stem)
        png = render_views(template, body.faces, mean_values, vmin, vmax, out_dir / f"mesh_{i}_mean.png",
                           title=f"{run.label}: mean joint error")
        page.image(png, "mean over joints: front and back")
        page.mesh_view(f"mesh{i}", template, body.faces, mean_values, vmin, vmax)
        page.links({Path(p).name: Path(p).relative_to(out_dir).as_posix() for p in files.values()})
        for col, name in enumerate(LSP14_NAMES):
            export_mesh(template, body.faces, values[:, col], joint_min, joint_max,
                        out_dir / "meshes" / f"sensitivity_{i}_{name}")
        page.p("Per-joint meshes (PLY and GLB) for every joint are in meshes/ beside this page.")
        np.save(out_dir / "meshes" / f"sensitivity_{i}_values.npy", values)


def _shared_range(arrays) -> tuple[float, float]:
    """1st-99th percentile of the finite values of all arrays: one colour range for every model, tight
    enough that a mean mesh whose values span a few tens of mm still shows where it is sensitive."""
    finite = np.concatenate([np.asarray(a)[np.isfinite(a)].ravel() for a in arrays])
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(x) for x in np.percentile(finite, [1, 99]))
    return low, max(high, low + 1.0)


def _provenance(run: Run) -> dict:
    keys = ("model", "dataset", "protocol", "seed", "precision", "batch_size", "memory_format", "threads",
            "execution", "conventions", "textures",
            "replay", "limit", "n_samples", "device", "versions", "git_commit", "command", "started", "finished")
    return {k: run.config.get(k) for k in keys if k in run.config}


# ---------------------------------------------------------------------------------------- HTML
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;margin-top:2em}h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.alert{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
figure{margin:.6em 0}figcaption{font-size:.8em;color:#555}img{max-width:100%}
pre{background:#f6f6f6;padding:.6em;font-size:.75em;overflow:auto;max-height:24em}
nav a{margin-right:1em}canvas.occmesh{border:1px solid #ddd;cursor:grab}
"""


class _Page:
    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.scripts: list[str] = []

    def h2(self, text, anchor):
        self.parts.append(f'<h2 id="{anchor}">{html.escape(text)}</h2>')

    def h3(self, text):
        self.parts.append(f"<h3>{html.escape(text)}</h3>")

    def p(self, text):
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def pre(self, text):
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def alert(self, text):
        self.parts.append(f'<div class="alert">{html.escape(text)}</div>')

    def warnings(self, runs):
        notes = list(dict.fromkeys(f"{r.label}: {w}" for r in runs for w in r.warnings()))
        if notes:
            self.parts.append('<div class="alert" id="warnings"><b>Not comparable to published numbers:</b><ul>'
                              + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul></div>")

    def table(self, frame: pd.DataFrame, cls=""):
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        rows = []
        for _, row in frame.iterrows():
            cells = []
            for value in row:
                if isinstance(value, (float, np.floating)):
                    cells.append(f'<td class="num">{"" if not np.isfinite(value) else f"{value:.1f}"}</td>')
                else:
                    cells.append(f"<td>{html.escape(str(value))}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        self.parts.append(f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
                          "</tbody></table>")

    def image(self, png_path, caption=""):
        data = base64.b64encode(Path(png_path).read_bytes()).decode()
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def links(self, mapping: dict):
        self.parts.append("<p>" + " ".join(f'<a href="{html.escape(href)}">{html.escape(name)}</a>'
                                           for name, href in mapping.items()) + "</p>")

    def script(self, js: str):
        self.scripts.append(js)

    def mesh_view(self, ident, vertices, faces, values, vmin, vmax):
        from occbench.sensmesh import value_colors
        payload = {
            "positions": base64.b64encode(np.asarray(vertices, np.float32).tobytes()).decode(),
            "colors": base64.b64encode(value_colors(values, vmin, vmax).astype(np.uint8).tobytes()).decode(),
            "indices": base64.b64encode(np.asarray(faces, np.uint32).tobytes()).decode(),
        }
        self.parts.append(f'<script type="application/json" id="{ident}">{json.dumps(payload)}</script>'
                          f'<canvas class="occmesh" data-mesh="{ident}" width="360" height="420"></canvas>')

    def render(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        from occbench import __version__
        nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
            ("summary", "Summary"), ("degradation", "Degradation"), ("per-joint", "Per joint"),
            ("heatmaps", "Heatmaps"), ("meshes", "Meshes"), ("provenance", "Provenance")))
        scripts = "".join(f"<script>{s}</script>" for s in self.scripts)
        return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<p>occbench {__version__}, written {stamp}.</p><nav>{nav}</nav>"
                + "".join(self.parts) + scripts + "</body></html>")
