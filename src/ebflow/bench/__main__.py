"""``python -m ebflow.bench`` runs the benchmark (the same as ``ebflow bench``)."""

import sys

from . import main

sys.exit(main())
