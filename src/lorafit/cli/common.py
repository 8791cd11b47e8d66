"""What every command prints first: the settings it runs with, before it loads anything slow."""

from __future__ import annotations

import sys
from dataclasses import asdict

import yaml


def print_settings(config, to_stderr: bool = False) -> None:
    """Every command shows the settings it runs with before it loads anything slow."""
    text = "settings:\n" + yaml.safe_dump(asdict(config), sort_keys=False).rstrip()
    print(text, file=sys.stderr if to_stderr else sys.stdout)
