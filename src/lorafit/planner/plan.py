"""A memory plan: the bytes a `lorafit train` step needs on a model, from its config alone.

`Planner` builds the model with fake tensors once (planner.fake_model), with the adapter attached the
way `lorafit train` attaches it, and then plans any number of workloads (a batch size and a length, or a
real micro-batch of examples) by running lorafit's own step on them (planner.simulate). What it counts is
exact for tensors (tests/planner compare it with the same step on real weights); what it adds on top is
stated as an allowance:

- on CPU, the C allocator: glibc keeps freed blocks in its heap and reuses them imperfectly, so the
  resident peak exceeds the live-tensor peak (with MALLOC_MMAP_THRESHOLD_=131072 the gap falls to 20-27 MiB,
  so it is heap retention, not hidden buffers; that setting makes every step ~1.5x slower). Fitted on the
  default model (bench/memory_plan.py's rows outside its validation set; lorafit issue 16's note), the gap is
  0.34-0.39 of the step's tensor peak when a micro-batch is one forward call and 0.62-0.72 when it is several
  (gradients made during one call's backward sit where the next call's activations would go). With
  activation checkpointing it follows the model, not the step's tensors (every layer is recomputed per
  call; 1.4-5.0 of a small tensor peak, 0.39-0.51 of the model's weights in the compute dtype), and a 4-bit or
  8-bit base adds a share of its layers' size in the compute dtype (each forward and backward dequantizes
  every one of them into a temporary: 0.10-0.40). These are fitted figures for this machine's glibc, stated
  as such in the plan; how they hold on other machines and much larger models is not measured.
- the runtime around the step: on CPU, the process's own memory before the model loads (Python, torch,
  transformers) plus the tokenizer, measured at start; on CUDA, the CUDA context (measured when a GPU is
  present, else CUDA_CONTEXT_ASSUMED, said as an assumption).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from lorafit.data import IGNORE_INDEX, TokenizedExample
from lorafit.errors import LorafitError
from lorafit.planner.fake_model import (
    QuantizedStandIn,
    build_fake_model,
    fake_mode,
    quantize_fake_model,
)
from lorafit.planner.simulate import StepMemory, simulate_steps
from lorafit.quantize import QuantizeSettings
from lorafit.train.loop import LoopSettings
from lorafit.train.step import layout_collate

MiB = 2**20
# the C allocator's resident excess (see above): a share of the step's tensor peak by how the micro-batch runs,
# with checkpointing a share of the model's weights in the compute dtype instead, plus for a quantized base a
# share of its quantized layers in the compute dtype
CPU_HEAP_SHARE = {"one call": 0.36, "several calls": 0.67}
CPU_HEAP_CHECKPOINTING_SHARE_OF_WEIGHTS = 0.45
CPU_HEAP_DEQUANTIZED_SHARE = 0.30
CUDA_ALLOCATOR_ALLOWANCE = 0.10  # the caching allocator's rounding and segments (not measured here: no GPU)

# Architectures the planner has been checked on (tests/planner): their decoder layers, attention and loss
# run through the paths it counts. Others are refused by name rather than planned wrongly.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "falcon")


@dataclass(frozen=True)
class Workload:
    """A micro-batch of `batch_size` examples of `length` tokens each, the first `prompt_length` without a
    label (the loss skips them), the first `shared_prefix` the same in every example (a system prompt)."""

    batch_size: int
    length: int
    prompt_length: int = 0
    shared_prefix: int = 0

    def examples(self, vocab_size: int) -> list[TokenizedExample]:
        rng = random.Random(0)
        prefix = [rng.randrange(1, vocab_size) for _ in range(self.shared_prefix)]
        examples = []
        for _ in range(self.batch_size):
            ids = prefix + [rng.randrange(1, vocab_size) for _ in range(self.length - self.shared_prefix)]
            examples.append(TokenizedExample(ids, [IGNORE_INDEX] * self.prompt_length + ids[self.prompt_length:]))
        return examples


@dataclass(frozen=True)
class Setup:
    """How the model is trained: what `lorafit train`'s flags say (adapter None: full fine-tuning)."""

    adapter: object | None  # a method config (LoraConfig, IA3Config, ...)
    dtype: torch.dtype = torch.float32
    quantize: QuantizeSettings | None = None
    gradient_checkpointing: bool = False
    row_tokens: int = 128
    device: str = "cpu"  # "cuda": fp32 weights compute under bf16 autocast, as the loop does there


@dataclass
class Plan:
    """One workload's bytes, by part (see `parts`)."""

    weights: dict[str, int]  # frozen weights by how they are stored ("bfloat16", "nf4 + scales", ...)
    trainable_parameters: int
    trainable_bytes: int
    step: StepMemory
    allocator: int
    runtime: int
    runtime_note: str
    layout: str
    allocator_note: str = "allocator allowance"

    @property
    def gradients(self) -> int:
        return self.trainable_bytes

    @property
    def optimizer_states(self) -> int:
        return 2 * self.trainable_bytes  # AdamW: exp_avg and exp_avg_sq, like the parameters (fp32)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def step_bytes(self) -> int:
        """The training step on top of the loaded model: its tensors at their peak plus the allocator's share."""
        return self.step.peak + self.allocator

    @property
    def total(self) -> int:
        return self.runtime + self.weight_bytes + self.trainable_bytes + self.step_bytes

    def parts(self) -> list[tuple[str, int]]:
        """(what, bytes) rows that add up to `total`."""
        rest = self.step.peak - self.gradients - self.optimizer_states - self.step.activations
        rows = [(f"weights, {kind}", size) for kind, size in self.weights.items() if size >= MiB // 10]
        rows += [(f"trainable parameters ({self.trainable_parameters:,}, fp32)", self.trainable_bytes),
                 ("their gradients (fp32)", self.gradients),
                 ("AdamW states (2 × fp32)", self.optimizer_states),
                 (f"activations saved for backward ({self.layout})", self.step.activations),
                 ("loss, backward and optimizer temporaries at the peak", rest),
                 (self.allocator_note, self.allocator),
                 (self.runtime_note, self.runtime)]
        small = sum(size for size in self.weights.values() if size < MiB // 10)
        if small:
            rows.insert(0, ("weights under 0.1 MiB (rotary tables, ...)", small))
        return rows


class Planner:
    """Plans for one model and one way of training it; `plan` is called per workload."""

    def __init__(self, config, setup: Setup, *, runtime: tuple[int, str] = (0, "runtime (not counted)"),
                 layout: tuple[bool, bool] = (True, True), trust_remote_code: bool = False) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED and not trust_remote_code:
            raise LorafitError(f"the memory planner does not know model_type {model_type!r}; it plans for "
                               + ", ".join(SUPPORTED))
        self.config, self.setup = config, setup
        self.runtime, self.runtime_note = runtime
        self.packed, self.shared_prefix = layout
        # The full model gives the weights; the step runs on the same model cut to one and to two decoder
        # layers, and the peak is extrapolated to all of them: every decoder layer adds the same bytes (its
        # weights' adapter, gradients, states, saved activations), so the peak is linear in the layer count
        # (tests/planner check the extrapolation against the whole model).
        self.layers = _layer_count(config)
        self.model, self.mode = self._build(config, trust_remote_code)
        self.weights, self.trainable_parameters, self.trainable_bytes = _weights(self.model, setup.quantize)
        self.compute_weight_bytes, self.dequantized_bytes = _in_compute_dtype(self.model, setup.dtype)
        self.shallow = [self._build(_with_layers(config, n), trust_remote_code) for n in (1, 2)]

    def _build(self, config, trust_remote_code: bool):
        setup, mode = self.setup, fake_mode()
        model = build_fake_model(config, setup.dtype, mode, trust_remote_code=trust_remote_code)
        with mode:
            if setup.adapter is None:
                model.requires_grad_(True)
            else:
                from lorafit.adapters import attach

                attach(model, setup.adapter)
        if setup.quantize is not None:
            if setup.adapter is None:
                raise LorafitError("--quantize applies to adapter methods: full fine-tuning trains every weight")
            if getattr(setup.adapter, "use_dora", False):
                raise LorafitError("the memory planner does not model DoRA on a quantized base (its weight norms "
                                   "dequantize every weight); plan DoRA on a float base, or LoRA with --quantize")
            quantize_fake_model(model, setup.quantize, setup.dtype, mode)
        return model, mode

    @property
    def vocab_size(self) -> int:
        return self.config.get_text_config().vocab_size

    @property
    def max_length(self) -> int | None:
        text = self.config.get_text_config()
        return getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)

    def check(self, workload: Workload) -> None:
        """Refuse a workload no run could have, in one line."""
        if workload.batch_size < 1:
            raise LorafitError(f"--batch-size must be >= 1, got {workload.batch_size}")
        if workload.length < 2:
            raise LorafitError(f"--max-length must be >= 2, got {workload.length}")
        if self.max_length and workload.length > self.max_length:
            raise LorafitError(f"--max-length {workload.length} is above this model's maximum of {self.max_length} "
                               "positions (max_position_embeddings in its config)")
        if not 0 <= workload.prompt_length < workload.length:
            raise LorafitError(f"--prompt-length must be in [0, {workload.length}), got {workload.prompt_length}")
        if not 0 <= workload.shared_prefix <= workload.prompt_length:
            raise LorafitError("--shared-prefix must be between 0 and --prompt-length (a shared prefix has no "
                               f"labels), got {workload.shared_prefix}")

    def plan(self, workload: Workload) -> Plan:
        self.check(workload)
        return self.plan_examples(workload.examples(self.vocab_size))

    def plan_examples(self, examples: list[TokenizedExample]) -> Plan:
        """The plan for one micro-batch of real (tokenised) examples."""
        setup = self.setup
        shared = self.shared_prefix and not setup.gradient_checkpointing
        collate = layout_collate(0, setup.row_tokens, packed=self.packed, shared_prefix=shared)
        pieces = collate(examples)
        settings = LoopSettings(steps=1, batch_size=len(examples), gradient_checkpointing=setup.gradient_checkpointing)
        # the loop autocasts to bf16 on CUDA unless the base is bf16 already (train/step.py: _autocast)
        autocast = torch.bfloat16 if setup.device == "cuda" and setup.dtype != torch.bfloat16 else None
        one, two = (simulate_steps(model, mode, pieces, settings, autocast_dtype=autocast, on_cpu=setup.device == "cpu")
                    for model, mode in self.shallow)
        step = _extrapolate(one, two, self.layers)
        if setup.device == "cpu":
            allocator, note = self._cpu_heap(step, len(pieces))
        else:
            allocator = int(CUDA_ALLOCATOR_ALLOWANCE * step.peak)
            note = f"CUDA caching allocator allowance ({CUDA_ALLOCATOR_ALLOWANCE:.0%} of the tensor peak; assumed)"
        return Plan(self.weights, self.trainable_parameters, self.trainable_bytes, step, allocator,
                    self.runtime, self.runtime_note, _layout_words(step.pieces, "prefix_ids" in pieces[0].inputs),
                    note)


    def _cpu_heap(self, step: StepMemory, calls: int) -> tuple[int, str]:
        """glibc's resident excess over the step's tensors, and the words that say how it was reckoned."""
        if self.setup.gradient_checkpointing:
            allocator = CPU_HEAP_CHECKPOINTING_SHARE_OF_WEIGHTS * self.compute_weight_bytes
            words = f"{CPU_HEAP_CHECKPOINTING_SHARE_OF_WEIGHTS:.2f} × the model's weights in the compute dtype: checkpointing"
        else:
            case = "one call" if calls == 1 else "several calls"
            allocator = CPU_HEAP_SHARE[case] * step.peak
            words = f"{CPU_HEAP_SHARE[case]:.2f} × the tensor peak: {case}"
        if self.dequantized_bytes:
            allocator += CPU_HEAP_DEQUANTIZED_SHARE * self.dequantized_bytes
            words += f", + {CPU_HEAP_DEQUANTIZED_SHARE:.2f} × the quantized layers dequantized"
        return int(allocator), f"C allocator allowance ({words}; fitted, planner/plan.py)"


def _layer_count(config) -> int:
    text = config.get_text_config()
    return int(getattr(text, "num_hidden_layers"))


def _with_layers(config, layers: int):
    shallow = copy.deepcopy(config)
    text = shallow.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:layers]
    return shallow


def _extrapolate(one: StepMemory, two: StepMemory, layers: int) -> StepMemory:
    """The step on `layers` decoder layers from the same step on one and on two."""
    def grow(a: int, b: int) -> int:
        return b + (layers - 2) * (b - a)

    per_layer = two.activations - one.activations
    return StepMemory(peak=grow(one.peak, two.peak), activations=grow(one.activations, two.activations),
                      per_layer=[per_layer] * layers, loss_peak=two.loss_peak, pieces=two.pieces)


def _layout_words(pieces: list[tuple], shared_prefix: bool) -> str:
    largest = max(pieces, key=lambda shape: shape[0] * shape[1])
    if shared_prefix:
        return f"a shared prefix, then {largest[0]} rows of {largest[1]} tokens"
    if largest[0] == 1:
        return f"largest forward call: one sequence of {largest[1]} tokens"
    return f"largest forward call: {largest[0]} rows × {largest[1]} tokens"


def _in_compute_dtype(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """(the model's weights' bytes in the compute dtype, those of the quantized layers alone), tied tensors once.
    Trainable ones count too: with full fine-tuning they are the whole model."""
    size = torch.empty((), dtype=dtype).element_size()
    other = dequantized = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, QuantizedStandIn):
            dequantized += module.in_features * module.out_features * size
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            other += tensor.numel() * tensor.element_size()
    return other + dequantized, dequantized


def _weights(model: nn.Module, quantize: QuantizeSettings | None) -> tuple[dict[str, int], int, int]:
    """(frozen bytes by storage kind, trainable count, trainable bytes), tied tensors once."""
    frozen: dict[str, int] = {}
    trainable_count = trainable_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        stand_in = isinstance(module, QuantizedStandIn)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            size = tensor.numel() * tensor.element_size()
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                trainable_count += tensor.numel()
                trainable_bytes += size
                continue
            kind = f"{quantize.kind} + scales" if stand_in and name != "bias" else str(tensor.dtype).removeprefix("torch.")
            frozen[kind] = frozen.get(kind, 0) + size
    return frozen, trainable_count, trainable_bytes
