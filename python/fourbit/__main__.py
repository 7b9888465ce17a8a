"""``python -m fourbit``: the ``fourbit`` command line (fourbit.cli)."""

from fourbit.cli import main

main(prog_name="fourbit")
