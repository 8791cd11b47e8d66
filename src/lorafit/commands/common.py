"""What several commands share: a base model with an optional adapter on top."""

from __future__ import annotations

from typing import Optional

from lorafit.io import load_adapter
from lorafit.models import load_model_and_tokenizer


def load_model_with_adapter(model: Optional[str], adapter: Optional[str], *, dtype: Optional[str] = None,
                            allow_pickle: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer) with the adapter folder, if any, attached; in eval mode."""
    base, tokenizer = load_model_and_tokenizer(model, dtype=dtype, allow_pickle=allow_pickle,
                                               trust_remote_code=trust_remote_code)
    if adapter is not None:
        load_adapter(base, adapter, allow_pickle=allow_pickle)
    return base.eval(), tokenizer
