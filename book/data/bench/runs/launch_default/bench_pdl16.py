"""The paged benchmark with PDL for 16-bit caches only (the decode.pdl override), json to argv's dir."""
import sys

from minikernels import planning
from minikernels.bench.cli import main

with planning.override({"decode.pdl": lambda device, int8: not int8}):
    sys.exit(main(sys.argv[1:]))
