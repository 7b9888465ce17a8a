import click


@click.command("doctor")
def doctor_cmd():
    """TODO"""
