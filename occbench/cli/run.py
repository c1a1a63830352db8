"""``occbench protocols``, ``occbench run``, ``occbench merge``."""
from __future__ import annotations

import click


@click.command()
@click.option("--verbose", "-v", is_flag=True, help="Print every parameter of every protocol.")
def protocols(verbose):
    """List the built-in protocols with their parameters (a .toml path works wherever a name does)."""
    from occbench.protocol import builtin_names, load_protocol
    shown_fields = {
        "clean": (), "occsens": ("size", "stride", "fill", "indexing", "reference", "report", "reduction"),
        "advocc": ("size", "stride", "fill", "textures", "visible_only", "report", "reduction"),
        "hkmr": ("patterns", "docs", "placement", "copies", "fill", "bar_length", "bar_angle", "rect_aspect",
                 "jitter"),
        "voc": ("copies", "min_objects", "max_objects", "reference"),
    }
    for name in builtin_names():
        p = load_protocol(name)
        n = p.n_windows(224)
        click.echo(f"{name:24s} {p.kind:8s} {n:4d} windows/sample  {p.description}")
        params = p.params()
        keys = [k for k in params if k not in ("name", "kind", "description", "source")] if verbose \
            else shown_fields[p.kind]
        if keys:
            click.echo("    " + ", ".join(f"{k}={params[k]}" for k in keys))


@click.command()
@click.option("--model", "-m", "model_name",
              help="Zoo or plugin model name (`occbench models`), or a builder: my_model.py:build, pkg.module:build.")
@click.option("--protocol", "-p", "protocol_name", help="Built-in protocol name or a .toml file.")
@click.option("--dataset", "-d", default="demo", show_default=True, help="Dataset name or SPIN-format npz.")
@click.option("--dataset-root", default=None, help="Folder of the dataset (else OCCBENCH_DATASETS_DIR).")
@click.option("--checkpoint", default=None,
              help="Official checkpoint file (else looked up in --checkpoint-dir); for a builder or plugin: passed to it.")
@click.option("--checkpoint-dir", default=None,
              help="Folder of the official checkpoint files (else OCCBENCH_CHECKPOINT_DIR, ~/.occbench/checkpoints).")
@click.option("--allow-partial", is_flag=True,
              help="Load a checkpoint that matches the model only partly (every result is labelled partial).")
@click.option("--weights", type=click.Choice(["checkpoint", "random"]), default="checkpoint", show_default=True,
              help="'random' = seeded random weights for smoke runs (labelled in results).")
@click.option("--model-option", "-o", "model_options", multiple=True, metavar="KEY=VALUE",
              help="Architecture option, e.g. -o backbone=resnet50 (repeatable).")
@click.option("--smpl-dir", default=None, help="Folder of the SMPL files (else OCCBENCH_SMPL_DIR, ~/.occbench/smpl).")
@click.option("--data-dir", default=None,
              help="Folder of J_regressor_h36m.npy and smpl_mean_params.npz (else OCCBENCH_DATA_DIR, ~/.occbench/data).")
@click.option("--out", "out_dir", default=None, help="Run directory (default runs/<model>-<protocol>-...).")
@click.option("--seed", default=None, type=int,
              help="0..2**32-1, default 0 (a --replay uses the replayed run's seed).")
@click.option("--batch-size", default=None,
              help="Windows per forward call: an integer >= 1, or 'auto' (measured on this machine in CPU "
                   "time, cached). Default: 32 on CPU, 64 on CUDA.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--memory-format", type=click.Choice(["auto", "channels_last", "contiguous"]), default="auto",
              show_default=True, help="auto: channels_last (a fixed default, never timed: the format changes "
                                      "the last bits of the numbers).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
@click.option("--threads", default=None, type=int,
              help="torch CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use).")
@click.option("--limit", default=None, type=int, help="Only the first N samples.")
@click.option("--max-windows", default=None, type=int, help="Only each sample's first N windows (quick looks).")
@click.option("--chunk-samples", default=None, type=int,
              help="Samples per resumable chunk, the unit a worker evaluates (default from the windows per sample).")
@click.option("--shard", default=None, help="k/N: run the k-th of N disjoint slices (join with `occbench merge`).")
@click.option("--replay", default=None, help="Finished run dir: evaluate its worst window of every sample.")
@click.option("--dtd-root", default=None, help="DTD folder (dtd/ or dtd/images) for AdvOcc textures.")
@click.option("--voc-root", default=None, help="Pascal VOC 2012 folder (VOCdevkit/VOC2012) for voc-objects.")
@click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE",
              help="Override a protocol field, e.g. --set stride=20 --set reference=clean (repeatable).")
@click.option("--workers", default=None, type=int,
              help="Evaluate chunks on N worker processes (default 1; one per --devices entry).")
@click.option("--backend", type=click.Choice(["loky", "dask", "ray"]), default="loky", show_default=True,
              help="loky: local processes; dask / ray: a cluster (extras occbench[dask] / occbench[ray]).")
@click.option("--scheduler", default=None, help="Dask scheduler address tcp://HOST:PORT (else a local cluster).")
@click.option("--address", default=None, help="Ray cluster address (auto, ray://HOST:PORT; else a local Ray).")
@click.option("--devices", default=None,
              help="Devices a node's workers take in turn, e.g. cuda:0,cuda:1; auto: one worker per GPU.")
@click.option("--worker-threads", default=1, show_default=True, type=int, help="Torch threads per worker.")
@click.option("--incremental", is_flag=True,
              help="Recompute only what each window changes (ResNet models, fp32; same numbers up to fp32 "
                   "rounding).")
@click.option("--search", type=click.Choice(["exhaustive", "adaptive"]), default="exhaustive", show_default=True,
              help="Worst-window protocols: try every window, or search the worst one with fewer forwards "
                   "(coarse grid, then the neighbourhoods of the worst windows; may miss it, recorded).")
@click.option("--no-progress", is_flag=True)
@click.option("--report", "report_dir", default=None,
              help="Where the run's HTML report goes (default reports/<run directory name>).")
@click.option("--no-report", is_flag=True, help="Do not write the HTML report at the end.")
def run(model_name, protocol_name, dataset, dataset_root, checkpoint, checkpoint_dir, allow_partial, weights,
        model_options, smpl_dir, data_dir, out_dir, seed, batch_size, precision, memory_format, device, threads,
        limit, max_windows, chunk_samples, shard, replay, dtd_root, voc_root, overrides, workers, backend,
        scheduler, address, devices, worker_threads, incremental, search, no_progress, report_dir, no_report):
    """Run a protocol end to end and write a run directory (resumes when it exists)."""
    from occbench.errors import UserError
    from occbench.keyvalue import parse_pairs
    if not model_name:
        raise UserError("--model is required (`occbench models` lists them)")
    from occbench.runner import parse_batch_size
    batch_size = parse_batch_size(batch_size)    # a bad value fails before the model loads
    if not protocol_name and not replay:
        raise UserError("--protocol is required (`occbench protocols` lists them)")
    from occbench.models import model_names
    from occbench.plugins import is_builder_path, plugin_entry_points
    in_zoo = model_name in model_names()
    if not in_zoo and not is_builder_path(model_name) and model_name not in plugin_entry_points():
        raise UserError(f"unknown model {model_name!r}; valid names: "
                        f"{', '.join(model_names() + sorted(plugin_entry_points()))}; "
                        "or a builder: path/to/file.py:function")
    from occbench.checks import check_run_options
    check_run_options(seed=seed, batch_size=batch_size, limit=limit, max_windows=max_windows, replay=replay)
    if weights == "random" and checkpoint is not None:
        raise UserError(f"--weights random with --checkpoint {checkpoint}: random weights ignore the checkpoint; "
                        "give one of them")
    protocol_overrides = parse_pairs(overrides, "--set")
    options = parse_pairs(model_options, "--model-option")
    if in_zoo:   # an outside builder's options are checked against its signature when it is called
        from occbench.zoo import check_model_options
        check_model_options(model_name, options)
    if not in_zoo and (checkpoint_dir or allow_partial):
        given = "--checkpoint-dir" if checkpoint_dir else "--allow-partial"
        raise UserError(f"{given}: only for zoo models; {model_name!r} is built by its own builder "
                        "(pass what it needs with --checkpoint or -o KEY=VALUE)")
    # zoo models load their body model and checkpoint with these; an outside builder gets only its options
    loader = dict(smpl_dir=smpl_dir, data_dir=data_dir, checkpoint_dir=checkpoint_dir,
                  allow_partial=allow_partial) if in_zoo else {}
    protocol = None
    if protocol_name:   # fail on a bad protocol before loading the model
        from occbench.protocol import load_protocol
        protocol = load_protocol(protocol_name, **protocol_overrides)
        from occbench.engine import adaptive_search_params
        adaptive_search_params(search, None, protocol, replay, max_windows)
        if in_zoo:
            from occbench.models import get_entry
            protocol.check_input_size(int(options.get("input_size", get_entry(model_name).input_size)))
    if chunk_samples is not None and chunk_samples < 1:
        raise UserError(f"--chunk-samples {chunk_samples}: give 1 or more")
    from occbench.parallel import ScaleOut
    scale = ScaleOut.from_options(workers, backend, scheduler, address, devices, worker_threads)
    if scale is not None and scale.devices and device is None and scale.devices[0] != "auto":
        device = scale.devices[0]      # the driver measures the batch size on the workers' kind of device
    from occbench.data import open_dataset
    from occbench.engine import run_protocol
    from occbench.plugins import load_any_model
    model = load_any_model(model_name, checkpoint=checkpoint, device=device, weights=weights,
                           seed=0 if seed is None else seed, **loader, **options)
    if protocol is not None and not in_zoo:
        protocol.check_input_size(int(model.input_size))
    body_dirs = {key: value for key, value in (("smpl_dir", smpl_dir), ("data_dir", data_dir)) if value}
    data = open_dataset(dataset, root=dataset_root, **body_dirs)   # the ground truth's body model
    run_dir = run_protocol(model, data, protocol_name, out_dir, seed=seed, batch_size=batch_size,
                           precision=precision, memory_format=memory_format, threads=threads, limit=limit,
                           max_windows=max_windows,
                           shard=shard, replay=replay, dtd_root=dtd_root, voc_root=voc_root,
                           chunk_samples=chunk_samples, progress=not no_progress,
                           protocol_overrides=protocol_overrides or None, scale=scale,
                           incremental=incremental, search=search)
    if shard or no_report:
        return
    from pathlib import Path

    from occbench.report import write_report
    index = write_report([run_dir], report_dir or Path("reports") / Path(run_dir).name,
                         title=f"occbench: {Path(run_dir).name}")
    click.echo(f"report: {index.resolve()}")


@click.command()
@click.argument("shard_dirs", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Run directory of the merged run.")
def merge(shard_dirs, out_dir):
    """Join the shard run directories of one run (`occbench run --shard k/N`) into one run directory."""
    from occbench.merge import merge_runs
    merge_runs(shard_dirs, out_dir)
