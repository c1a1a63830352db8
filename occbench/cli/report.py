"""``occbench report``: run directories -> one self-contained HTML page."""
from __future__ import annotations

import click


@click.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", "out_dir", default="reports/latest", show_default=True,
              help="Folder for index.html and the mesh files.")
@click.option("--title", default="occbench report", show_default=True)
@click.option("--heatmap-samples", default=3, show_default=True, type=int,
              help="Per-sample heatmap grids per run (the worst samples), besides the dataset average.")
@click.option("--no-meshes", is_flag=True, help="Skip the occlusion sensitivity meshes (faster).")
@click.option("--smpl-dir", default=None, help="SMPL files the meshes are posed with (else OCCBENCH_SMPL_DIR).")
@click.option("--data-dir", default=None, help="J_regressor / mean-parameter files (else OCCBENCH_DATA_DIR).")
def report(run_dirs, out_dir, title, heatmap_samples, no_meshes, smpl_dir, data_dir):
    """Write OUT/index.html for one or more finished RUN_DIRS (compared side by side where comparable)."""
    from occbench.report import write_report
    index = write_report(run_dirs, out_dir, title=title, heatmap_samples=heatmap_samples, meshes=not no_meshes,
                         smpl_dir=smpl_dir, data_dir=data_dir)
    click.echo(f"report: {index.resolve()}")
