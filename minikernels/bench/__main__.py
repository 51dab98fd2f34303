"""``python -m minikernels.bench``."""

import sys

from .cli import main

sys.exit(main())
