"""The projection-cost microbenchmark: ``python -m gradsurgery.bench --help``.

It times, on the device given, each wrapper's surgery split into Gram, solve and apply,
next to the memory-bandwidth floor measured in the same run and to other implementations
of the same projections (see :mod:`gradsurgery.bench.peers`). Optional dependencies
(``pip install 'gradsurgery[bench]'``: TorchJD, quadprog, matplotlib, tqdm) are imported
only when used; what is missing is skipped with a message.
"""

from gradsurgery.bench.cli import main

__all__ = ["main"]
