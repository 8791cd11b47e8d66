"""The two things compared: lorafit's training step and peft's documented standard, on the same batches.

lorafit: `attach`, the micro-batch layout its loop chooses (`choose_collate`: shared prompt prefix
once, else packed, else padded) and the loop's own step, `lorafit.train.step.train_step`
(`summed_token_loss` with the output head on labelled positions only, backward, clip, AdamW), with
the loop's check of the weights after it; no learning-rate schedule.

peft: `get_peft_model` + a plain loop: rows right-padded to the longest, labels = input ids with
-100 on prompt and padding, `model(input_ids, attention_mask, labels).loss` (full logits; the mean over
label tokens), backward, clip, AdamW. Same examples, order, optimizer, learning rate and dtype.
"""

from __future__ import annotations

import contextlib

import torch
from common import LR, MAX_GRAD_NORM, SEED

from lorafit.data.tokenizing import IGNORE_INDEX
from lorafit.train.attention import use_fp32_attention
from lorafit.train.gradients import StepGradients
from lorafit.train.step import choose_collate, train_step, weights_are_finite


class Workload:
    """A LoRA configuration: rank, alpha and targets (lorafit's and peft's spelling)."""

    def __init__(self, name: str, r: int, alpha: int, targets):
        self.name, self.r, self.alpha, self.targets = name, r, alpha, targets


QV8 = Workload("r=8 q,v", 8, 16, ["q_proj", "v_proj"])
ALL16 = Workload("r=16 all-linear", 16, 32, "all-linear")


class LorafitSide:
    name = "lorafit"

    def __init__(self, model, tokenizer, workload: Workload, seed: int = SEED):
        import lorafit

        torch.manual_seed(seed)
        lorafit.attach(model, lorafit.LoraConfig(r=workload.r, alpha=workload.alpha, dropout=0.0,
                                                 target_modules=workload.targets))
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=LR, weight_decay=0.0)
        self.gradients = StepGradients(self.parameters)  # made once, as the loop's setup makes them
        # the layout `lorafit train` picks with its defaults (row_tokens 128, no gradient checkpointing)
        self.collate = choose_collate(model, model.config.vocab_size, tokenizer.pad_token_id, row_tokens=128,
                                      gradient_checkpointing=False, echo=lambda _: None)
        self.body = None  # the loop's torch.compile'd body when `lorafit train --compile` is measured
        use_fp32_attention(model)  # what the loop does for a bf16 base on CPU (lorafit/train/attention.py)
        model.train()

    def adapter_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module path: (A, B)} of the default adapter, to start peft from the same weights."""
        found: dict[str, dict] = {}
        for name, parameter in self.model.named_parameters():
            for kind in ("lora_A", "lora_B"):
                marker = f".{kind}.default"
                if name.endswith(marker):
                    found.setdefault(name[: -len(marker)], {})[kind] = parameter.detach()
        return {path: (t["lora_A"], t["lora_B"]) for path, t in found.items()}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def step(self, examples: list) -> dict:
        pieces = self.collate(examples)  # one micro-batch as one or more forward calls, as the loop runs it
        step = train_step(self.model, pieces, self.parameters, self.optimizer, MAX_GRAD_NORM, body=self.body,
                          gradients=self.gradients)
        weights_are_finite(self.parameters)  # the loop checks the weights after every step (issue 13)
        return {"loss": step.loss, "real_tokens": step.real_tokens, "label_tokens": step.label_tokens,
                "computed_tokens": sum(_computed_tokens(piece.inputs) for piece in pieces)}


def _computed_tokens(inputs: dict) -> int:
    """Positions the model actually runs (padding included; a shared prefix counted once)."""
    total = inputs["input_ids"].numel()
    if "prefix_ids" in inputs:
        total += inputs["prefix_ids"].numel()
    return total


def peft_collate(examples: list, pad_id: int) -> dict:
    """peft/transformers' standard: right-pad to the longest row; labels unshifted, -100 on prompt and padding."""
    width = max(len(e.input_ids) for e in examples)
    ids, mask, labels = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        ids.append(example.input_ids + [pad_id] * pad)
        mask.append([1] * len(example.input_ids) + [0] * pad)
        labels.append(list(example.labels) + [IGNORE_INDEX] * pad)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def peft_config(workload: Workload, adapter_r: int | None = None):
    import peft

    return peft.LoraConfig(r=adapter_r or workload.r, lora_alpha=workload.alpha, lora_dropout=0.0,
                           target_modules=workload.targets, task_type="CAUSAL_LM")


class PeftSide:
    name = "peft"

    def __init__(self, model, tokenizer, workload: Workload, start_from: dict | None = None, seed: int = SEED):
        import peft

        torch.manual_seed(seed)
        self.model = peft.get_peft_model(model, peft_config(workload))
        if start_from is not None:
            copy_adapter_into_peft(self.model, start_from)
        self.pad_id = tokenizer.pad_token_id
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=LR, weight_decay=0.0)
        self.gradients = StepGradients(self.parameters)  # made once, as the loop's setup makes them
        self.model.train()

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters)

    def step(self, examples: list) -> dict:
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in peft_collate(examples, self.pad_id).items()}
        # On CUDA the same bf16 autocast as lorafit's step (a Trainer's bf16=True): like for like; fp32 on CPU.
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
            loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        labels = inputs["labels"]
        return {"loss": loss.item(), "real_tokens": int(inputs["attention_mask"].sum()),
                "label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()), "computed_tokens": labels.numel()}


@torch.no_grad()
def copy_adapter_into_peft(peft_model, tensors: dict, adapter: str = "default") -> None:
    """Set peft's lora_A/lora_B (nn.Linear weights, A: r×in, B: out×r) to lorafit's (same layout)."""
    inner = peft_model.base_model.model
    for path, (a, b) in tensors.items():
        module = inner.get_submodule(path)
        module.lora_A[adapter].weight.copy_(a)
        module.lora_B[adapter].weight.copy_(b)
    copied = len(tensors)
    wrapped = sum(1 for m in inner.modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {}))
    if copied != wrapped:
        raise RuntimeError(f"copied {copied} adapters into peft but peft wrapped {wrapped} modules")


def load_base(device: str = "cpu"):
    """The embedded SmolLM2-135M-Instruct in fp32 and its tokenizer."""
    from lorafit.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(None, device=device)


def load_tokenizer():
    """The embedded model's tokenizer alone (the bench's parent process stays small)."""
    from transformers import AutoTokenizer

    from lorafit.models.loading import resolve_model_folder

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_folder(None), local_files_only=True)
    if tokenizer.pad_token is None:  # as load_model_and_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
