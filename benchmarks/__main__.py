"""``python -m benchmarks`` (from the repository root) runs the benchmark."""

import sys

from . import main

sys.exit(main())
