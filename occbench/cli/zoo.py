"""``occbench models`` (what the zoo holds, which checkpoint files it wants, which are present) and
``occbench check-checkpoint`` (does a checkpoint file fit a zoo model, key by key)."""
from __future__ import annotations

import json
import sys

import click


def checkpoint_status(entry, checkpoint_dir=None) -> tuple[str | None, str]:
    """(path of the first official file found or None, folder searched); builds nothing, imports no torch."""
    from occbench.assets import find_checkpoint_file
    found, folder = find_checkpoint_file(entry.checkpoint_files, checkpoint_dir)
    return (str(found) if found else None), str(folder)


@click.command("models")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with the official checkpoint files (default: $OCCBENCH_CHECKPOINT_DIR, "
                   "~/.occbench/checkpoints).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per model instead of text.")
def models(checkpoint_dir, as_json):
    """List every zoo model: what it is, its input size, the checkpoint files it loads and whether they
    are present; then the models of installed plugins (entry-point group occbench.models). Builds no network."""
    from occbench.models import get_entry, model_names
    for name in model_names():
        entry = get_entry(name)
        found, folder = checkpoint_status(entry, checkpoint_dir)
        if as_json:
            click.echo(json.dumps({
                "name": name, "description": entry.description, "input_size": entry.input_size,
                "options": entry.options, "checkpoint_files": list(entry.checkpoint_files),
                "checkpoint_format": entry.checkpoint_format, "checkpoint_found": found,
                "checkpoint_dir": folder, "checkpoint_source": entry.checkpoint_source,
                "paper": entry.paper, "license": entry.license}))
            continue
        click.echo(f"{name}: {entry.description}")
        click.echo(f"  input {entry.input_size}x{entry.input_size}"
                   + (f"; options {entry.options}" if entry.options else "")
                   + (f"; {entry.paper}" if entry.paper else ""))
        click.echo(f"  checkpoint ({entry.checkpoint_format or 'any'}): {' or '.join(entry.checkpoint_files)}")
        if found:
            click.echo(f"    found: {found}")
        else:
            click.echo(f"    not found in {folder}; source: {entry.checkpoint_source}")
        if entry.license:
            click.echo(f"  license: {entry.license}")
    from occbench.plugins import describe_plugin, plugin_entry_points
    zoo = set(model_names())
    for name, ep in sorted(plugin_entry_points().items()):
        info = describe_plugin(name, ep)
        if name in zoo:
            info["description"] = f"shadowed by the zoo model of that name; run it as --model {ep.value}"
        if as_json:
            click.echo(json.dumps(info))
            continue
        click.echo(f"{name}: {info['description']}")
        click.echo(f"  outside model from plugin {info['package']} {info['version']}: builder {info['builder']}")


@click.command("check-checkpoint")
@click.option("--model", "model_name", required=True, help="Zoo model name (see `occbench models`).")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--model-option", "--option", "-o", "option_pairs", multiple=True, metavar="KEY=VALUE",
              help="Architecture option of the model, e.g. -o backbone=resnet50 (repeatable).")
@click.option("--allow-partial", is_flag=True,
              help="Accept a file that matches only partly (exit 0 if at least one tensor matches).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="SPIN data folder with smpl_mean_params.npz (only fills buffers; shapes do not depend on it).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the run.json record).")
def check_checkpoint(model_name, file, option_pairs, allow_partial, data_dir, as_json):
    """Compare checkpoint FILE with zoo model --model key by key: prints OK with the counts, or every
    missing, unexpected, mis-shaped key by name. Exit status 0 when it matches, 1 otherwise."""
    from occbench.checkpoints import check_checkpoint as compare
    from occbench.models import get_entry
    from occbench.zoo import build_with_options

    try:
        entry = get_entry(model_name)
    except KeyError as err:
        raise click.BadParameter(str(err.args[0]), param_hint="--model") from None
    from occbench.keyvalue import parse_pairs
    options = parse_pairs(option_pairs, "--model-option")
    mean_params = None
    if data_dir is not None:
        from occbench.body import load_mean_params
        mean_params = load_mean_params(data_dir)
    model = build_with_options(model_name, mean_params, options)
    report = compare(model, file, strip_prefixes=entry.strip_prefixes, known_unused=entry.known_unused)
    report.model = model_name
    if as_json:
        click.echo(json.dumps(report.summary(), indent=1))
    else:
        click.echo(report.describe())
    if report.ok:
        return
    if allow_partial and report.loaded and not report.nonfinite:
        click.echo(f"--allow-partial: {len(report.loaded)} of {report.n_model_tensors} tensors would load; "
                   "results from it are labelled partial")
        return
    if not as_json:
        click.echo("to run with the matching tensors only, pass --allow-partial", err=True)
    # sys.exit, not ctx.exit: occbench.cli.main runs click with standalone_mode=False, which turns
    # click's Exit into a return value that the console script would drop (exit status 0).
    sys.exit(1)
