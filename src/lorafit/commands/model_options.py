"""The model options several commands take, each defined once: its type, its flag and its help.

Every command that loads a base model (train, eval, generate, merge, inspect) declares these fields with
these types; tyro reads the help from here. Light: no torch, so `--help` answers at once.
"""

from __future__ import annotations

from typing import Annotated, Optional

import tyro

from lorafit.config import ModelDtype

ModelPath = Annotated[Optional[str], tyro.conf.arg(help=(
    "Model folder or .gguf file; 'default' is the embedded SmolLM2-135M-Instruct, which is also what train and "
    "inspect use without it. With an adapter: by default the base the adapter records; a different one is refused."))]
Dtype = Annotated[Optional[ModelDtype], tyro.conf.arg(help=(
    "dtype the base model is loaded in (and merge saves in): float32 unless given."))]
AllowPickle = Annotated[bool, tyro.conf.arg(help="Allow pickle (.bin) weights, which can run code when loaded.")]
TrustRemoteCode = Annotated[bool, tyro.conf.arg(help="Run model code shipped with the model folder.")]
