"""`python -m lorafit ...` and `torchrun ... -m lorafit train ...`: the `lorafit` command."""

import sys

from lorafit.cli.main import main

sys.exit(main())
