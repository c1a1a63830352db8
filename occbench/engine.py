"""The protocol run: plan chunks, resume, execute, finish; replay, merging of shards, :func:`benchmark`.

Replay evaluates another run's worst windows (transfer); merging joins the shards of one run.

Every protocol is (dataset x windows) -> occluded batches on the model's device -> per-joint errors streamed
to a run directory. For each chunk of samples the engine

1. loads the samples (a background thread prepares the next chunk while the model runs),
2. evaluates the chunk (:func:`occbench.evaluate.evaluate_chunk`: clean crops moved to the model's device
   once, resized to its input size; each sample's window table; batches of occluded crops composed on the
   device with one tensor expression; per-joint MPJPE, PA-MPJPE and PCKh),
3. writes the chunk atomically (:mod:`occbench.rundir`).

Model execution (precision, memory format, batch size) is :mod:`occbench.runner`; the errors and the
metrics.json aggregation are :mod:`occbench.scoring`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from occbench import metrics
from occbench import occluders as occ
from occbench import provenance as prov
from occbench.checks import check_run_options, safe_folder_name
from occbench.errors import UserError
from occbench.evaluate import ChunkContext, crop_from, crop_resolution, evaluate_chunk, load_chunk
from occbench.protocol import Protocol, load_protocol, validate
from occbench.rundir import RUN_JSON, RunDir, Shard, existing_config, plan_chunks
from occbench.runner import Runner, plan_execution
from occbench.search import SEARCHES, SearchParams
from occbench.scoring import format_summary, summarize
from occbench.voc import VocOccluders

ADAPTIVE_CHUNK_SAMPLES = 8


def _textures_for(protocol: Protocol, input_size: int, dtd_root=None):
    if not protocol.uses_textures:
        return None, None
    if protocol.textures == "dtd" and dtd_root is not None:
        source = occ.dtd_source(dtd_root)
    else:
        if protocol.textures == "dtd":
            print("warning: no --dtd-root: using scikit-image's bundled images as textures; results are NOT "
                  "comparable to published AdvOcc numbers", file=sys.stderr)
        source = occ.skimage_source()
    bank = occ.TextureBank(source, short_side=input_size)
    info = {"kind": source.kind, "root": source.root, "count": len(source.names),
            "fingerprint": source.fingerprint(), "comparable": source.comparable}
    return bank, info


def _incremental_for(runner: Runner, precision: str) -> dict:
    """Attach incremental inference to ``runner`` where it applies; run.json's record of the choice."""
    from occbench.models.incremental import IncrementalRunner, supports_incremental, unused_warning
    support = supports_incremental(runner.model, precision)
    if support.use:
        runner.incremental = IncrementalRunner(runner.model)
    else:
        print(f"warning: {unused_warning(support)}", file=sys.stderr)
    return support.as_dict()


def _replay_windows(replay_dir, protocol: Protocol | None, seed: int | None):
    """(protocol, seed, {sample_id: [worst window]}, info) from a finished run directory."""
    source = RunDir.load(replay_dir)
    if not source.is_finished():
        raise UserError(f"--replay {replay_dir}: the run is not finished (no samples.parquet); finish it first")
    params = dict(source.config["protocol"])
    replayed = validate(params, origin=f"{replay_dir}/{RUN_JSON}")
    if protocol is not None and protocol.fingerprint() != replayed.fingerprint():
        raise UserError(f"--replay {replay_dir}: that run used protocol {replayed.name!r} with other parameters; "
                        "leave out --protocol or give the same one")
    table = source.read_table("samples", columns=["sample_id", "worst_window"]).to_pydict()
    only = {sid: [w] for sid, w in zip(table["sample_id"], table["worst_window"]) if w >= 0}
    info = {"run_dir": str(source.path.resolve()), "model": source.config.get("model", {}).get("name"),
            "seed": source.config["seed"], "n_windows": len(only)}
    return replayed, source.config["seed"], only, info, source.config.get("textures")


def run_protocol(model, dataset, protocol, out_dir=None, *, seed: int | None = None, batch_size: int | None = None,
                 precision: str = "fp32", memory_format: str = "auto", threads: int | None = None,
                 limit: int | None = None,
                 max_windows: int | None = None,
                 shard: str | Shard | None = None, replay=None, dtd_root=None, voc_root=None,
                 chunk_samples: int | None = None, progress: bool = True, model_info: dict | None = None,
                 protocol_overrides: dict | None = None, quiet: bool = False, scale=None,
                 incremental: bool = False, search: str = "exhaustive",
                 search_params: SearchParams | None = None) -> Path:
    """Run ``protocol`` for ``model`` on ``dataset``; return the run directory (resumed if it exists).

    model: a ZooModel (from :func:`occbench.load_model`); dataset: from :func:`occbench.open_dataset`;
    protocol: a :class:`Protocol`, a built-in name or a TOML path. replay: a finished run directory whose
    per-sample worst windows are evaluated (transfer of an adversarial set); the protocol and seed are
    then taken from that run (leave ``seed`` out; without replay it defaults to 0). Shard: "k/N".
    chunk_samples: samples per resumable chunk (default from the windows per sample). scale: an
    :class:`occbench.parallel.ScaleOut` evaluates the chunks on many workers (same tables as one process).
    incremental: recompute only what each window changes (:mod:`occbench.models.incremental`; ResNet models
    in fp32; equal to the full forward up to fp32 rounding; does nothing, with a warning, where it is not
    supported or measured below 1.1x). search: "exhaustive" (every window) or "adaptive" (worst-window
    protocols only: :mod:`occbench.search` with ``search_params``, by default :class:`SearchParams`'s).
    Returns the run directory path.
    """
    check_run_options(seed=seed, batch_size=batch_size, limit=limit, max_windows=max_windows, replay=replay)
    seed = 0 if seed is None else seed
    replay_info, replay_textures = None, None
    only = None
    if replay is not None:
        given = load_protocol(protocol, **(protocol_overrides or {})) if protocol is not None else None
        protocol, seed, only, replay_info, replay_textures = _replay_windows(replay, given, seed)
    else:
        protocol = load_protocol(protocol, **(protocol_overrides or {}))
    protocol.check_input_size(int(getattr(model, "input_size", 224)))
    shard = Shard.parse(shard) if not isinstance(shard, Shard) else shard
    device = next(model.parameters()).device
    input_size = int(getattr(model, "input_size", 224))
    textures, texture_info = _textures_for(protocol, input_size, dtd_root)
    if replay_textures is not None and texture_info is not None and \
            replay_textures.get("fingerprint") != texture_info["fingerprint"]:
        raise UserError(f"--replay {replay}: that run drew textures from another set "
                        f"({replay_textures.get('kind')} {replay_textures.get('root')}); pass the same --dtd-root")
    voc = VocOccluders.open(voc_root) if protocol.uses_voc else None
    adaptive = adaptive_search_params(search, search_params, protocol, replay, max_windows)
    n_total = len(dataset)
    n_samples = min(n_total, limit) if limit else n_total
    per_sample = protocol.n_windows(input_size) or 1
    if max_windows is not None:
        per_sample = max(1, min(per_sample, max_windows))
    if replay is not None:
        per_sample = 1
    if adaptive is not None:   # a chunk's samples search together: more samples keep the rounds' batches full
        chunk_samples = chunk_samples or ADAPTIVE_CHUNK_SAMPLES
    chunk_samples = chunk_samples or int(min(64, max(1, math.ceil(256 / (per_sample + 1)))))
    provenance = getattr(model, "provenance", {}) or {}
    model_info = {**(getattr(model, "run_info", None) or {}), **(model_info or {})}   # outside models' record
    model_name = (model_info or {}).get("name") or provenance.get("model") or getattr(model, "name", "model")
    conventions = dict(getattr(dataset, "conventions", {}) or {})
    pelvis = protocol.pelvis if protocol.pelvis != "dataset" else conventions.get("pelvis", "h36m-root")
    if protocol.reference == "gt" and conventions.get("pelvis", pelvis) != pelvis:
        # the GT joints arrive pelvis-subtracted with the dataset's convention; the prediction must match it
        raise UserError(f"protocol {protocol.name!r} asks for pelvis = {pelvis!r} but dataset "
                        f"{getattr(dataset, 'name', '')!r} gives GT aligned with {conventions['pelvis']!r}; "
                        "use pelvis = 'dataset'")
    if out_dir is None:
        tag = f"-shard{shard.index}of{shard.count}" if shard else ""
        tag += f"-limit{limit}" if limit else ""
        tag += "-replay" if replay is not None else ""
        tag += "-adaptive" if adaptive is not None else ""
        out_dir = Path("runs") / safe_folder_name(
            f"{model_name}-{protocol.name}-{getattr(dataset, 'name', 'dataset')}-s{seed}{tag}")
    out_dir = Path(out_dir)

    runner = Runner(model, precision=precision)
    recorded = existing_config(out_dir)   # resume: reuse how it ran
    if recorded:
        chunk_samples = recorded.get("chunk_samples", chunk_samples)
    window_batch = per_sample * min(chunk_samples, max(1, n_samples))   # most windows one chunk holds
    if scale is not None and threads is None:
        threads = scale.threads   # the workers compute the numbers: record their thread count
    execution = plan_execution(runner, input_size, batch_size=batch_size, memory_format=memory_format,
                               threads=threads, recorded=recorded, max_batch=max(1, min(64, window_batch)),
                               model_key=f"{model_name} {type(model).__name__} "
                                         f"{json.dumps(provenance.get('options'), sort_keys=True, default=str)}")
    batch_size, memory_format, precision = execution.batch_size, execution.memory_format, execution.precision
    incremental_info = _incremental_for(runner, precision) if incremental else None

    body = getattr(model, "body_model", None)
    config = {
        "occbench_run": 1,
        "model": {"name": model_name, "class": type(model).__name__, "input_size": input_size,
                  "weights": provenance.get("weights"), "checkpoint": provenance.get("checkpoint"),
                  "checkpoint_sha256": provenance.get("checkpoint_sha256"),
                  "options": provenance.get("options"), **(model_info or {})},
        "dataset": {"name": getattr(dataset, "name", None), "n_total": n_total,
                    "fingerprint": prov.dataset_fingerprint(dataset)},
        "protocol": protocol.params(),
        "protocol_fingerprint": protocol.fingerprint(),
        "seed": int(seed),
        "precision": precision,
        "batch_size": int(batch_size),
        "memory_format": memory_format,
        "threads": execution.threads,
        "chunk_samples": int(chunk_samples),
        "n_samples": int(n_samples),
        "limit": limit,
        "max_windows": max_windows,
        "shard": str(shard) if shard else None,
        "textures": texture_info,
        "replay": replay_info,
        **({"search": adaptive.record()} if adaptive is not None else {}),
        "conventions": {**conventions, "pelvis": pelvis, "joint_set": "lsp14",
                        "reduction": protocol.reduction, "pckh_threshold": protocol.pckh_threshold,
                        "pa_mpjpe_min_joints": metrics.MIN_PA_JOINTS,
                        "nan_rule": "a NaN at an evaluated joint makes a reduction NaN",
                        "body_model_standin": bool(getattr(body, "is_standin", False)),
                        "geometry_scale": f"{input_size}/224 (rounded half up, each grid position on its own), "
                                          f"occluders drawn at {input_size} px",
                        "crop_resolution": crop_resolution(model, dataset, input_size)},
    }
    extra = {
        "dataset_provenance": getattr(dataset, "provenance", None),
        "model_provenance": provenance,
        "comparable": bool((texture_info or {}).get("comparable", True))
                      and not bool(getattr(body, "is_standin", False))
                      and provenance.get("weights", "checkpoint") != "random"
                      and not (provenance.get("checkpoint_report") or {}).get("partial"),
        "autotune": execution.autotune,
        "execution": execution.record(),
        "device": {"type": device.type, "name": prov.device_name(device)},
        "versions": prov.versions(),
        "git_commit": prov.git_commit(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "status": "running",
        "incremental": incremental_info,
    }
    run = RunDir.open_or_create(out_dir, {**config, **extra})
    if run.config.get("incremental") != incremental_info:   # a resumed run records this invocation's choice
        run.update(incremental=incremental_info)
    try:
        ctx = ChunkContext(protocol=protocol, runner=runner, input_size=input_size, seed=int(seed),
                           batch_size=int(batch_size), pelvis=pelvis, textures=textures, voc=voc, only=only,
                           max_windows=max_windows, crop_from=crop_from(model, dataset, input_size),
                           search=adaptive)
        return _run_chunks(run, runner, dataset, n_samples, chunk_samples, shard, progress, quiet, ctx,
                           scale=scale, dtd_root=dtd_root, voc_root=voc_root)
    finally:
        run.close()


def _run_chunks(run: RunDir, runner: Runner, dataset, n_samples, chunk_samples, shard, progress, quiet,
                ctx: ChunkContext, scale=None, dtd_root=None, voc_root=None) -> Path:
    """Execute the chunks not done yet (damaged ones recomputed and reported), then finish the run."""
    chunks = plan_chunks(n_samples, chunk_samples, shard)
    todo = [c for c in chunks if not run.has_chunk(c[0])]
    _report_repairs(run)
    start = time.perf_counter()
    runner.forward_seconds = 0.0
    if scale is not None and todo:
        from occbench.parallel import run_chunks
        stats = run_chunks(run, ctx, runner.model, dataset, todo, chunks, scale, progress and not quiet,
                           dtd_root=dtd_root, voc_root=voc_root)
    else:
        stats = execute_chunks(run, ctx, dataset, todo, total=sum(e - s for _, s, e in chunks),
                               progress=progress and not quiet)
    if todo:
        wall = time.perf_counter() - start
        run.update(timing={"wall_s": round(wall, 3), "forward_s": round(runner.forward_seconds, 3),
                           "windows": stats["windows"], "samples": stats["samples"],
                           "forward_share": round(runner.forward_seconds / max(wall, 1e-9), 4),
                           "note": "this session's compute; forward_s is host time inside model calls "
                                   "(exact on CPU, launch time only on CUDA)"})
    metrics = summarize(run, [c for c, _, _ in chunks])
    run.concatenate([c for c, _, _ in chunks])
    run.write_metrics(metrics)
    if ctx.search is not None:
        run.update(search_cost=_search_cost(run, ctx.protocol.n_windows(ctx.input_size)))
    run.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not quiet:
        print(format_summary(run.config, metrics))
        print(f"run directory: {run.path}")
    return run.path


def _report_repairs(run: RunDir) -> None:
    """Say on stderr, and record in run.json, what resuming found damaged or left over."""
    if run.recomputed:
        for chunk, reason in run.recomputed:
            where = "run.json" if chunk < 0 else f"chunk {chunk}"
            print(f"warning: {run.path}: {where}: {reason}; recomputed", file=sys.stderr)
        run.update(recomputed_chunks=run.config.get("recomputed_chunks", []) + [
            {"chunk": chunk, "reason": reason, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            for chunk, reason in run.recomputed])
    if run.cleaned:
        print(f"note: {run.path}: removed {len(run.cleaned)} temporary file(s) of an interrupted write",
              file=sys.stderr)


def adaptive_search_params(search: str, params: SearchParams | None, protocol: Protocol, replay, max_windows):
    """The adaptive search's parameters, None for the exhaustive search; refuses what it cannot search."""
    if search not in SEARCHES:
        raise UserError(f"--search {search!r}: valid: {', '.join(SEARCHES)}")
    if search == "exhaustive":
        return None
    if protocol.kind not in ("occsens", "advocc") or protocol.report != "worst":
        raise UserError(f"--search adaptive: protocol {protocol.name!r} reports {protocol.report!r} over "
                        f"{protocol.kind!r} windows; the adaptive search finds worst windows on a sliding grid "
                        "(advocc40, advocc80); leave out --search")
    if replay is not None or max_windows is not None:
        raise UserError("--search adaptive cannot be combined with --replay or --max-windows (they choose the "
                        "windows themselves); leave out one of them")
    return params or SearchParams()


def _search_cost(run: RunDir, grid_windows: int) -> dict:
    """Forwards the adaptive search spent (run.json ``search_cost``), next to the exhaustive grid."""
    evaluated = run.read_table("samples", columns=["n_windows"]).column("n_windows").to_numpy()
    per_sample = float(evaluated.mean()) if len(evaluated) else 0.0
    return {"windows": int(evaluated.sum()), "windows_per_sample": round(per_sample, 2),
            "grid_windows_per_sample": int(grid_windows),
            "fewer_forwards": round(grid_windows / per_sample, 3) if per_sample else None}


def execute_chunks(run: RunDir, ctx: ChunkContext, dataset, todo, total: int, progress: bool = True) -> dict:
    """Evaluate and write the chunks ``todo`` [(chunk, first, end)] of ``run``; ``total`` samples of the run
    (for the progress bar; the ones not in ``todo`` are done). Returns {"samples", "windows"} evaluated."""
    from tqdm import tqdm
    bar = tqdm(total=total, initial=total - sum(e - s for _, s, e in todo), unit="sample", disable=not progress,
               dynamic_ncols=True, desc=ctx.protocol.name)
    stats = {"samples": 0, "windows": 0}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(load_chunk, ctx, dataset, *todo[0][1:]) if todo else None
        for i, (chunk, first, end) in enumerate(todo):
            loaded, failed = future.result()
            if i + 1 < len(todo):
                future = pool.submit(load_chunk, ctx, dataset, *todo[i + 1][1:])
            tables = evaluate_chunk(ctx, loaded, failed)
            run.write_chunk(chunk, tables)
            stats["samples"] += end - first
            stats["windows"] += int(sum(tables["samples"].column("n_windows").to_pylist()))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats['samples'] / elapsed:.2f} samples/s, "
                                f"{stats['windows'] / elapsed:.1f} windows/s")
            bar.update(end - first)
    bar.close()
    return stats


def benchmark(model="pare", protocol="clean", dataset="demo", *, out_dir=None, weights="checkpoint",
              checkpoint=None, device=None, model_options: dict | None = None, dataset_root=None,
              **run_options) -> Path:
    """One call from names to a finished run directory (RobustBench style)::

        run_dir = occbench.benchmark(model="pare", protocol="advocc80", dataset="demo", weights="random")

    model may be a zoo name, a plugin name or a builder path (``my_model.py:build``); model / dataset may also
    be objects (a ZooModel or ``occbench.wrap_model``'s model, a Dataset). Other keywords go to
    :func:`run_protocol`.
    """
    from occbench.data import open_dataset
    from occbench.plugins import load_any_model
    if isinstance(model, str):
        model = load_any_model(model, checkpoint=checkpoint, device=device, weights=weights,
                               seed=run_options.get("seed", 0), **(model_options or {}))
    if isinstance(dataset, str):
        dataset = open_dataset(dataset, root=dataset_root)
    return run_protocol(model, dataset, protocol, out_dir, **run_options)
