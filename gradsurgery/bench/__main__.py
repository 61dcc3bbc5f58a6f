"""``python -m gradsurgery.bench``: see :mod:`gradsurgery.bench.cli`."""

from gradsurgery.bench.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
