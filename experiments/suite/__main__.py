"""``python -m experiments.suite``."""

import sys

from experiments.suite import main

sys.exit(main())
