"""Tests for lorafit.inference.evaluate: which examples exact match can score, and the bounded held-out set."""

import numpy as np

from lorafit.data.prepared import prepare_conversations
from lorafit.inference.evaluate import held_out_from, matchable
from tests.conftest import CHATML_TEMPLATE, byte_tokenizer


def chat(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def test_exact_match_scores_only_replies_that_fit_in_max_new_tokens():
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)  # one token per byte
    short, exact, long = chat("q", "abc"), chat("q", "abcdefgh"), chat("q", "abcdefghi")
    text = [{"role": "text", "content": "no reply"}]
    assert matchable(tokenizer, [short, exact, long, text], max_new_tokens=8) == [short, exact]
    assert matchable(tokenizer, [short], max_new_tokens=0) == []


def test_the_held_out_set_scores_the_first_examples_that_fit_and_counts_the_rest():
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    conversations = [chat("q" * 80, "a"), *[chat(f"q{i}", "a") for i in range(5)]]
    prepared = prepare_conversations(tokenizer, conversations, 64, False, "held")
    held = held_out_from(prepared, np.arange(len(prepared)), 3, "held")
    assert held.conversations == conversations[1:4] and len(held.examples) == 3
    assert held.left_out == 1 and held.stats.skipped_too_long == 1
    assert "loss on 3 examples (the first of 5 that fit; --eval-examples)" in held.describe_scored(3, 8)
