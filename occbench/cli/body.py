"""``occbench body-model``: convert SMPL .pkl files, write the stand-in body, show which body is used."""
from __future__ import annotations

import json

import click


@click.group("body-model")
def body_model():
    """SMPL body model files: convert, stand-in, info."""


@body_model.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
def convert(src, out):
    """Write a plain-numpy .npz copy of an SMPL .pkl SRC (no chumpy needed) to OUT."""
    from occbench.smpl_io import convert_smpl_pkl
    from occbench.assets import sha256_of
    path = convert_smpl_pkl(src, out)
    click.echo(f"wrote {path} (sha256 {sha256_of(path)})")


@body_model.command("standin")
@click.argument("out_dir", type=click.Path(file_okay=False))
def standin(out_dir):
    """Write the procedural stand-in body (SMPL file format, NOT SMPL) into OUT_DIR."""
    from occbench.standin import STANDIN_FILES, write_standin
    folder = write_standin(out_dir)
    click.echo(f"wrote stand-in body ({', '.join(STANDIN_FILES)}) to {folder}")
    click.echo("numbers computed with it are not comparable to published results")


@body_model.command("info")
@click.option("--smpl-dir", type=click.Path(), default=None, help="SMPL folder (default: $OCCBENCH_SMPL_DIR, "
              "~/.occbench/smpl, else the stand-in).")
@click.option("--data-dir", type=click.Path(), default=None, help="Folder with J_regressor_h36m.npy "
              "(default: $OCCBENCH_DATA_DIR, ~/.occbench/data).")
@click.option("--gender", type=click.Choice(["neutral", "male", "female"]), default="neutral", show_default=True)
def info(smpl_dir, data_dir, gender):
    """Print which body model occbench would use and where each file came from (provenance, JSON)."""
    import warnings
    from occbench.body import load_body_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        body = load_body_model(smpl_dir=smpl_dir, data_dir=data_dir, gender=gender)
    summary = {"vertices": int(body.smpl.v_template.shape[0]), "faces": int(body.faces.shape[0]),
               **body.provenance}
    click.echo(json.dumps(summary, indent=2))
