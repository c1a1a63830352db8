"""``occbench train``: train or fine-tune a zoo model (see occbench/train.py)."""
from __future__ import annotations

import click


@click.command()
@click.option("--model", "-m", "model_name", required=True, help="Zoo model name (`occbench models`).")
@click.option("--backbone", default=None, help="Backbone option of the model (e.g. resnet50, hrnet_w32).")
@click.option("--model-option", "--option", "-o", "model_options", multiple=True, metavar="KEY=VALUE",
              help="Architecture option, e.g. -o head=3x256 -o input_size=128 (repeatable).")
@click.option("--dataset", "-d", required=True,
              help="Dataset name, synthetic-set folder (occbench datasets make-synthetic) or SPIN-format npz.")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Total optimisation steps.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write; FILE.json describes the training, FILE.state holds the resume state.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Adam learning rate (peak for cosine).")
@click.option("--lr-schedule", default="constant", show_default=True, type=click.Choice(["constant", "cosine"]),
              help="cosine: 2 % linear warm-up, then cosine decay to 1 % of --lr at --steps.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue from FILE.state (the step count goes on).")
@click.option("--loss-weight", "loss_weights", multiple=True, metavar="TERM=VALUE",
              help="Loss weight override: 3d, 2d, pose, betas, part (repeatable).")
@click.option("--part-loss-steps", default=None, type=int,
              help="Part-segmentation loss only for the first N steps (PARE's hybrid schedule; default: all).")
@click.option("--occluder-prob", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Probability of a random synthetic occluder per training sample.")
@click.option("--no-augment", is_flag=True, help="No jitter, colour or occluder augmentation.")
@click.option("--limit", default=None, type=int, help="Only the first N samples of the dataset.")
@click.option("--init-checkpoint", default=None, help="Start from these weights (fine-tuning; loaded strictly).")
@click.option("--half", is_flag=True, help="Store the weights as fp16 (loaded back as fp32).")
@click.option("--save-every", default=50, show_default=True, type=click.IntRange(min=1),
              help="Write the resume state every N steps.")
@click.option("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
@click.option("--threads", "num_threads", default=None, type=int, help="torch CPU threads.")
@click.option("--no-progress", is_flag=True)
def train(model_name, backbone, model_options, dataset, steps, out, batch_size, lr, lr_schedule, seed, resume,
          loss_weights, part_loss_steps, occluder_prob, no_augment, limit, init_checkpoint, half, save_every, device,
          num_threads, no_progress):
    """Train MODEL on DATASET for STEPS steps; write OUT (the model's own checkpoint layout) + OUT.json."""
    from occbench.errors import UserError
    from occbench.keyvalue import parse_pair, parse_pairs
    from occbench.train import DEFAULT_WEIGHTS, TrainConfig, train as run_training

    options = parse_pairs(model_options, "--model-option")
    if backbone:
        options["backbone"] = backbone
    weights = {}
    for text in loss_weights:
        key, value = parse_pair(text, "--loss-weight")
        if key not in DEFAULT_WEIGHTS or not isinstance(value, (int, float)):
            raise UserError(f"--loss-weight {text!r}: expected TERM=NUMBER with TERM one of "
                            f"{', '.join(DEFAULT_WEIGHTS)}")
        weights[key] = float(value)
    cfg = TrainConfig(model=model_name, dataset=dataset, out=out, steps=steps, batch_size=batch_size, lr=lr,
                      lr_schedule=lr_schedule, seed=seed, options=options, loss_weights=weights,
                      part_loss_steps=part_loss_steps, augment=not no_augment, occluder_prob=occluder_prob,
                      limit=limit, init_checkpoint=init_checkpoint, half=half, save_every=save_every,
                      device=device, num_threads=num_threads)
    result = run_training(cfg, resume=resume, progress=not no_progress)
    click.echo(f"{result.steps} steps, loss {result.first_loss:.4f} -> {result.last_loss:.4f}; "
               f"wrote {result.checkpoint} and {result.sidecar}")
