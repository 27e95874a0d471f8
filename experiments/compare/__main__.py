"""``python -m experiments.compare``: the same as ``medattn compare``."""

from experiments.compare import main

main()
