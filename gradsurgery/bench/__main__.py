"""``python -m gradsurgery.bench``: see :mod:`gradsurgery.bench.cli`."""

from gradsurgery.bench.cli import main

main()
