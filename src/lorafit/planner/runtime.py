"""What the planner measures on this machine: the runtime's own memory, the memory available, the layout.

The runtime allowance is measured, not assumed, where it can be: on CPU it is this process's resident
memory once torch and transformers are loaded (a `lorafit train` process carries the same) plus what
loading the model's tokenizer adds, what importing bitsandbytes adds for a quantized base, and what the
architecture's own code adds (transformers imports a model's modules the first time it builds one: 16-37 MiB
for Llama on this machine, which a `lorafit train` process holds once it has loaded its model); on CUDA it
is the CUDA context, measured when a GPU is present.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError

MiB = 2**20
CUDA_CONTEXT_ASSUMED = 500 * MiB  # typical for a CUDA 12 context; said as an assumption when no GPU can be measured


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), or 0 where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class Runtime:
    """The memory around the training step, by part (see the module docstring)."""

    process: int  # on CPU: this process before any model (Python, torch, transformers); on CUDA: the context
    note: str
    tokenizer: int = 0
    bitsandbytes: int = 0  # its import (native library and modules), when the base is quantized
    architecture: int = 0  # the model's Python code, imported when the layout probe first builds the architecture
    layout: tuple[bool, bool] = (False, False)  # layout_of's answer, probed while measuring `architecture`

    @property
    def total(self) -> int:
        return self.process + self.tokenizer + self.bitsandbytes + self.architecture


def measure_runtime(device: str, model_folder: Path | None, quantized: bool = False, config=None,
                    trust_remote_code: bool = False) -> Runtime:
    """The runtime's parts, measured in this process (it must not have loaded a model or bitsandbytes yet).

    With `config`, the layout probe (layout_of) runs here too, and on CPU what it leaves resident counts as
    the architecture's code: it is the first time this process builds the architecture, as loading the
    model is in a training process.
    """
    if device == "cuda":
        layout = layout_of(config, trust_remote_code) if config is not None else (False, False)
        if torch.cuda.is_available():
            torch.cuda.init()
            free, total = torch.cuda.mem_get_info()
            return Runtime(total - free - torch.cuda.memory_reserved(), "runtime: the CUDA context (measured on this GPU)",
                           layout=layout)
        return Runtime(CUDA_CONTEXT_ASSUMED, "runtime: the CUDA context (assumed: no GPU here to measure)",
                       layout=layout)
    before = resident_bytes()
    tokenizer = 0
    if model_folder is not None and Path(model_folder).is_dir():
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
            tokenizer = max(resident_bytes() - before, 0)
        except (OSError, ValueError):
            tokenizer = 0
    bitsandbytes = 0
    if quantized:
        from lorafit.models.quantize import import_bitsandbytes

        start = resident_bytes()
        import_bitsandbytes()
        bitsandbytes = max(resident_bytes() - start, 0)
    architecture, layout = 0, (False, False)
    if config is not None:
        start = resident_bytes()
        layout = layout_of(config, trust_remote_code)
        architecture = max(resident_bytes() - start, 0)
    parts = ["Python, torch, transformers"] + (["the tokenizer"] if tokenizer else []) + (
        ["bitsandbytes"] if bitsandbytes else []) + (["the architecture's code"] if architecture else [])
    words = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    return Runtime(before, f"runtime: {words} (measured at start)", tokenizer, bitsandbytes, architecture, layout)


def mem_available() -> int:
    """MemAvailable from /proc/meminfo: what the kernel can give a process without swapping."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise LorafitError("cannot read this machine's available memory (/proc/meminfo); give the memory or the "
                       "batch size explicitly (--device-memory, --batch-size N)")


def available_memory(device: str) -> tuple[int, str]:
    """(bytes, where the figure comes from) a training run could use on `device` here."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LorafitError("--device cuda: there is no GPU here; give --device-memory (e.g. 24GiB)")
        return torch.cuda.get_device_properties(0).total_memory, "this GPU's memory"
    # this process's own memory is freed when it ends, for the run to use
    return mem_available() + resident_bytes(), "this machine's available memory"


def tiny_twin(config):
    """The same architecture at toy sizes (one layer, width 64), to probe its behaviour for real in a second."""
    twin = copy.deepcopy(config)
    text = twin.get_text_config()
    heads = 4
    sizes = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": heads, "vocab_size": 128,
             "intermediate_size": 128, "head_dim": 16, "ffn_hidden_size": 128, "n_inner": 128}
    for name, value in sizes.items():
        if hasattr(text, name) and getattr(text, name) is not None:
            setattr(text, name, value)
    if getattr(text, "num_key_value_heads", None):
        text.num_key_value_heads = min(text.num_key_value_heads, 2) if config.num_key_value_heads < \
            config.num_attention_heads else heads
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids inside the toy vocabulary
        if isinstance(getattr(text, name, None), int):
            setattr(text, name, 0)
    return twin


def layout_of(config, trust_remote_code: bool = False) -> tuple[bool, bool]:
    """(packing exact, prefix sharing exact) for this architecture, probed on its tiny twin as the loop probes
    the real model; (False, False) — padded rows, no shared prefix — when the twin cannot be built."""
    from transformers import AutoModelForCausalLM

    from lorafit.train.forward import packing_is_exact, prefix_sharing_is_exact
    from lorafit.train.output_head import check_output_head

    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_twin(config), trust_remote_code=trust_remote_code)
    except (TypeError, ValueError, RuntimeError, AttributeError, AssertionError):
        return False, False
    vocab = model.config.get_text_config().vocab_size
    check_output_head(model)  # as the loop does first: a model run whole shares no prefix
    return packing_is_exact(model, vocab), prefix_sharing_is_exact(model, vocab)
