"""Run a pneumo-ray sweep: ``python sweeps/run.py --config sweeps/configs/default.yaml``.

Same as ``pneumo-ray sweep``; see ``--help`` for the overrides.
"""

import sys

from pneumo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
