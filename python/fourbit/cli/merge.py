import click


@click.command("merge")
def merge_cmd():
    """TODO"""
