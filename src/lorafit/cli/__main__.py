"""`python -m lorafit.cli`: the same as `lorafit` (kept for launchers written before `python -m lorafit`)."""

import sys

from lorafit.cli.main import main

sys.exit(main())
