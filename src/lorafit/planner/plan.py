"""A memory plan: the bytes a `lorafit train` step needs on a model, from its config alone.

`Planner` builds the model with fake tensors once (planner.fake_model), with the adapter attached the
way `lorafit train` attaches it, and then plans any number of workloads (a batch size and a length, or a
real micro-batch of examples) by running lorafit's own step on them (planner.simulate). What it counts is
exact for tensors (tests/planner compare it with the same step on real weights); what it adds on top is
stated as an allowance:

- on CPU, the C allocator: the resident peak exceeds the live-tensor peak because glibc's heap reuses the
  holes freed tensors leave imperfectly. bench/heap_replay.py shows where it comes from: a measured step's
  whole malloc log, replayed through glibc, grows the heap as the traced process grew (within 7% for a float
  base, bench/RESULTS-heap-replay.md), and leaving out the small C++ allocations made between the tensors
  (autograd's nodes, TensorImpls, saved-variable records) removes half or more of the excess (IA3, 4 × 256:
  +102 → +10 MiB over 234 MiB of tensors; all-linear r=8, 4 × 512: +592 → +102 MiB): they split the holes the
  next activations would have reused. Their lifetimes are not the tensors', so the planner, which sees tensors
  only, cannot replay them (synthetic ones tied to the tensors' lifetimes gave about a quarter of the IA3 excess
  in an earlier three-step trace); it states the excess as fitted shares (CPU_HEAP_SHARES) of what it grows
  with: the step's tensor peak, more when a micro-batch is several forward calls (the heap left by one call's
  backward is what the next call's forward must fit into);
  with activation checkpointing the model's weights in the compute dtype instead (every layer is recomputed
  per call, so the churn follows the model, not the small saved peak); and for a 4-bit or 8-bit base, in
  addition, its layers' size in the compute dtype (each forward and backward dequantizes every one of them
  into a temporary). The shares are a least-squares fit to bench/memory_plan.py's measured rows outside its
  six validation settings, which then fall within ±10% out of sample; they are this machine's glibc, said as
  fitted in the plan, and how they hold on other machines and much larger models is not measured.
- the runtime around the step: on CPU, the process's own memory before the model loads (Python, torch,
  transformers) plus the tokenizer, measured at start; on CUDA, the CUDA context (measured when a GPU is
  present, else CUDA_CONTEXT_ASSUMED, said as an assumption).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch
from torch import nn

from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.errors import LorafitError
from lorafit.models.quantize import QuantizeSettings
from lorafit.planner.fake_model import (
    QuantizedStandIn,
    build_fake_model,
    fake_mode,
    quantize_fake_model,
)
from lorafit.planner.simulate import StepMemory, simulate_steps
from lorafit.train.loop import LoopSettings
from lorafit.train.step import layout_collate

MiB = 2**20
# The C allocator's resident excess on CPU (see above): a share of what it grows with. The step's tensor peak, by
# whether a micro-batch is one forward call or several; with checkpointing the model's weights in the compute dtype
# instead; for a 4/8-bit base, in addition, its quantized layers in the compute dtype. Fitted by
# `python bench/memory_plan.py --fit` to the measured bench rows outside the CI test's six
# (bench/RESULTS-memory-plan.json); tests/planner checks that these are that fit.
CPU_HEAP_SHARES = {"one call": 0.37, "several calls": 0.59, "checkpointing": 0.30, "dequantized": 0.25}
_HEAP_BASIS_WORDS = {"one call": "the tensor peak: one call", "several calls": "the tensor peak: several calls",
                     "checkpointing": "the model's weights in the compute dtype: checkpointing",
                     "dequantized": "the quantized layers dequantized"}
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
    heap_bases: dict[str, int] = field(default_factory=dict)  # on CPU: what each share of CPU_HEAP_SHARES multiplies

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
                from lorafit.core.adapters import attach

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
        bases = {}
        if setup.device == "cpu":
            bases = self._cpu_heap_bases(step, len(pieces))
            allocator = int(sum(CPU_HEAP_SHARES[name] * size for name, size in bases.items()))
            words = ", + ".join(f"{CPU_HEAP_SHARES[name]:.2f} × {_HEAP_BASIS_WORDS[name]}" for name in bases)
            note = f"C allocator allowance ({words}; fitted, planner/plan.py)"
        else:
            allocator = int(CUDA_ALLOCATOR_ALLOWANCE * step.peak)
            note = f"CUDA caching allocator allowance ({CUDA_ALLOCATOR_ALLOWANCE:.0%} of the tensor peak; assumed)"
        return Plan(self.weights, self.trainable_parameters, self.trainable_bytes, step, allocator,
                    self.runtime, self.runtime_note, _layout_words(step.pieces, "prefix_ids" in pieces[0].inputs),
                    note, bases)

    def _cpu_heap_bases(self, step: StepMemory, calls: int) -> dict[str, int]:
        """The bytes each share of glibc's resident excess multiplies (CPU_HEAP_SHARES), for this step."""
        if self.setup.gradient_checkpointing:
            bases = {"checkpointing": self.compute_weight_bytes}
        else:
            bases = {"one call" if calls == 1 else "several calls": step.peak}
        if self.dequantized_bytes:
            bases["dequantized"] = self.dequantized_bytes
        return bases


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
