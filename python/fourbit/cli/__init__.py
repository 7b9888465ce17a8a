"""The ``fourbit`` command line: the QLoRA workflow over fourbit's public Python API.

Commands (each in its own module): ``doctor``, ``estimate``, ``quantize``, ``inspect``,
``train``, ``merge``. Exit codes: 0 success; 1 an unexpected error; 2 a bad flag, argument,
config key or malformed YAML; 3 a missing or invalid input file; 4 the model does not fit
(estimate --gpu-mem); 5 a check failed (doctor, train's quality checks); 6 the destination
exists (pass --overwrite)."""

from __future__ import annotations

import os

import click

from ._common import EXIT_INPUT, CliError


class _Group(click.Group):
    """Turns the library's own input errors (a missing file, a ValueError naming the bad key or
    value) into a one-line message and exit code 3 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (FileNotFoundError, ValueError) as e:
            raise CliError(str(e), EXIT_INPUT) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             help=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else __doc__)
@click.version_option(package_name="fourbit", prog_name="fourbit")
def main():
    # Models are read from local directories only; nothing is fetched from the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _register() -> None:
    from .doctor import doctor_cmd
    from .estimate import estimate_cmd
    from .inspect import inspect_cmd
    from .merge import merge_cmd
    from .quantize import quantize_cmd
    from .train import train_cmd

    for cmd in (doctor_cmd, estimate_cmd, quantize_cmd, inspect_cmd, train_cmd, merge_cmd):
        main.add_command(cmd)


_register()
__all__ = ["main"]
