"""Replies from a model (and its adapter) to chat prompts: greedy and batched for exact match, or one reply
streamed as it is generated, greedy or sampled (`lorafit generate`). The model's chat template is applied."""

from __future__ import annotations

import torch

from lorafit.data.tokenizing import encode_prompt


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies to chat prompts (messages without the final assistant turn), batched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    replies = []
    for start in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, messages) for messages in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        # Left padding: every prompt then ends at the same position, where generation starts.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
        for row in output[:, width:]:
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return replies


@torch.no_grad()
def stream_reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0) -> str:
    """One reply to `messages`, printed token by token as it comes; greedy when `temperature` is 0."""
    from transformers import TextStreamer

    input_ids = torch.tensor([encode_prompt(tokenizer, messages)], device=model.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False}
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
