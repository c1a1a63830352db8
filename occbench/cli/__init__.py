"""The ``occbench`` command. Each sub-module holds one group of commands; imports stay lazy so
``occbench --help`` is fast."""
from __future__ import annotations

import importlib
import sys

import click

# command name -> "module:attribute" (a click command or group)
COMMANDS = {
    "models": "occbench.cli.zoo:models",
    "check-checkpoint": "occbench.cli.zoo:check_checkpoint",
    "protocols": "occbench.cli.run:protocols",
    "run": "occbench.cli.run:run",
    "merge": "occbench.cli.run:merge",
    "datasets": "occbench.cli.datasets:datasets",
    "body-model": "occbench.cli.body:body_model",
    "report": "occbench.cli.report:report",
    "train": "occbench.cli.train:train",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                return None
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="occbench")
def cli():
    """occbench: where and how badly does a 3D human pose-and-shape regressor break under occlusion."""


def main(argv=None):
    """Console entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    from occbench.errors import UserError
    try:
        rc = cli.main(args=argv, prog_name="occbench", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
