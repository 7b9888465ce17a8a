import click


@click.command("train")
def train_cmd():
    """TODO"""
