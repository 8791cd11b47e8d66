"""What the commands share: the --adapter flag (eval, generate, merge, export) and the settings they print first."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Annotated, Optional

import tyro
import yaml

_ADAPTER = "Adapter folder (lorafit or peft), a lorafit run folder (its adapter/) or a checkpoint of one."
AdapterFolder = Annotated[str, tyro.conf.arg(help=_ADAPTER)]
OptionalAdapterFolder = Annotated[Optional[str], tyro.conf.arg(help=_ADAPTER + " Without it: the base alone.")]


def print_settings(config, to_stderr: bool = False) -> None:
    """Every command shows the settings it runs with before it loads anything slow."""
    text = "settings:\n" + yaml.safe_dump(asdict(config), sort_keys=False).rstrip()
    print(text, file=sys.stderr if to_stderr else sys.stdout)
