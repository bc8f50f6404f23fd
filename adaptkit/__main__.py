"""``python -m adaptkit``: the same CLI as the ``adaptkit`` console script."""
from adaptkit.cli import run

if __name__ == "__main__":  # pragma: no branch
    run()
