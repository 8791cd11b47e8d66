"""llama.cpp itself (llama-cpp-python, the test extra) as the oracle for lorafit's GGUF files.

ggml's AMX kernels crash on this project's machines (SIGSEGV in ggml_backend_amx_mul_mat, with the unmodified
SmolLM2 GGUF too, on a CPU with AMX-INT8), so models load without llama.cpp's extra buffer types, as
`llama-cli --no-repack` does: its plain CPU kernels, the same on every x86 machine. llama-cpp-python's
`Llama` has no keyword for that, so the default model parameters it starts from are wrapped while it loads.
The key/value cache is kept in f32 (llama.cpp's default is f16, which alone rounds attention by ~1e-3), so
float models can be compared with lorafit's fp32 at float tolerances.
"""

from __future__ import annotations

import os

import numpy as np
import pytest


def llama_cpp():
    """The llama_cpp module; in CI (where `make test` installs it) a missing build fails instead of skipping."""
    if os.environ.get("CI"):
        import llama_cpp as module

        return module
    return pytest.importorskip("llama_cpp")


def load(model_path, lora_path=None, n_ctx: int = 512):
    module = llama_cpp()
    low = module.llama_cpp
    original = low.llama_model_default_params

    def without_extra_buffer_types():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffer_types
    try:
        return module.Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                            n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0,
                            type_k=module.GGML_TYPE_F32, type_v=module.GGML_TYPE_F32)
    finally:
        low.llama_model_default_params = original


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (float32, (len, vocab))."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: list[int], max_new_tokens: int) -> list[int]:
    """llama.cpp's greedy continuation of `ids`, up to its end-of-generation token."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if llm.token_eos() == token or len(out) >= max_new_tokens:
            break
        out.append(int(token))
        if len(out) >= max_new_tokens:
            break
    return out


def exact_match(llm, tokenizer, conversations: list, max_new_tokens: int = 32) -> dict:
    """The built-in task's exact match as llama.cpp answers it: each held-out prompt rendered with the chat
    template, tokenized by llama.cpp itself (and checked against lorafit's tokens), answered greedily."""
    from lorafit.data.tasks import evaluation_pairs
    from lorafit.data.tasks import exact_match as same_reply
    from lorafit.data.tokenizing import encode_prompt

    pairs = evaluation_pairs(conversations)
    hits, tokens_differ, replies = 0, 0, []
    for prompt, reference in pairs:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        tokens_differ += ids != encode_prompt(tokenizer, prompt)
        reply = llm.detokenize(greedy(llm, ids, max_new_tokens)).decode("utf-8", errors="replace").strip()
        replies.append(reply)
        hits += same_reply(reply, reference)
    return {"exact_match": hits / len(pairs), "prompts": len(pairs), "tokenized_differently": tokens_differ,
            "replies": replies}
