"""`lorafit inspect`: a model's adaptable modules, which ones the targets select, and the counts.

Works from a config.json alone (--model-config): the model is built on the meta device (shapes, no
memory), so a 70B configuration is inspected as fast as a small one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Optional

from lorafit.cli.common import print_settings
from lorafit.core.registry import check_ranges
from lorafit.core.selection import parse_targets
from lorafit.errors import LorafitError
from lorafit.methods import DEFAULT_METHOD
from lorafit.models.options import ModelSourceOptions


@dataclass(kw_only=True)
class InspectConfig(ModelSourceOptions):
    """Show which modules LoRA would adapt and how many parameters that adds."""

    model_config: Optional[str] = None
    """A model's config.json instead of a model (nothing is loaded but the shapes)."""
    targets: Optional[list[str]] = None
    """Module names (space- or comma-separated), 'all-linear' or one regex (default: the architecture's usual choice)."""
    r: int = 8
    """LoRA rank."""
    layers: Optional[list[int]] = None
    """Only these block indices (e.g. --layers 0 1 2)."""
    all: bool = False
    """List every module path instead of one line per module name."""


def _shape(module) -> str:
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        return f"{weight.shape[0]}→{weight.shape[1]}"
    if type(module).__name__ == "Embedding":
        return f"{weight.shape[0]}×{weight.shape[1]}"
    return f"{weight.shape[1]}→{weight.shape[0]}"


def run(config: InspectConfig, echo=print, given=None) -> str:
    from lorafit.core.accounting import report
    from lorafit.core.adapters import attach
    from lorafit.core.registry import config_from_options, entry_for
    from lorafit.core.targeting import adaptable_types, select_modules
    from lorafit.models.loading import build_on_meta, load_config, resolve_model_folder

    if config.model and config.model_config:
        raise LorafitError("give --model or --model-config, not both")
    check_ranges(config)
    print_settings(config)
    source = config.model_config or resolve_model_folder(None if config.model == "default" else config.model)
    model_config = load_config(source, trust_remote_code=config.trust_remote_code)
    model = build_on_meta(model_config, trust_remote_code=config.trust_remote_code)
    adapter = replace(config_from_options(DEFAULT_METHOD, parse_targets(config.targets), {"r": config.r}),
                      layers=config.layers)
    selected = set(select_modules(model, adapter))
    modules = [(path, m) for path, m in model.named_modules() if isinstance(m, adaptable_types())]

    lines = [f"{type(model).__name__} ({model_config.model_type}) from {source}"]
    if config.all:
        lines += [f"  {'*' if path in selected else ' '} {path:<60} {type(m).__name__:<10} {_shape(m)}"
                  for path, m in modules]
    else:
        groups: OrderedDict = OrderedDict()
        for path, module in modules:
            key = (path.rsplit(".", 1)[-1], type(module).__name__, _shape(module), path in selected)
            groups[key] = groups.get(key, 0) + 1
        lines.append(f"  {'module':<20}{'type':<12}{'shape':<16}{'count':>6}  selected")
        for (name, kind, shape, chosen), count in groups.items():
            lines.append(f"  {name:<20}{kind:<12}{shape:<16}{count:>6}  {'yes' if chosen else ''}")
    attach(model, adapter)
    lines.append(f"{entry_for(DEFAULT_METHOD).title} r={config.r} on {len(selected)} modules: {report(model)}")
    text = "\n".join(lines)
    echo(text)
    return text
