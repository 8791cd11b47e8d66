"""Tiny random models built from configs (no hub): the fixtures every test file shares."""

import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Prepared data goes to a folder of this test session, never the user's cache (and subprocesses inherit it);
# the converted default model stays in the shared cache, as converting it again takes a while.
os.environ["LORAFIT_DATA_CACHE"] = tempfile.mkdtemp(prefix="lorafit-test-data-cache-")


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    )
    config = LlamaConfig(**{**settings, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_neox(seed: int = 0):
    """GPT-NeoX: a fused nn.Linear `query_key_value` whose rows interleave q, k, v per head."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config).eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.5):
    """Give every adapter tensor random values so the bypass is not zero (identity tests prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def random_examples(count: int, seed: int = 0, lengths: tuple = (3, 15), vocab: int = 64) -> list:
    """Random token sequences whose first half is masked prompt: training data for loop/batching tests."""
    from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(*lengths, (1,), generator=generator))
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2:]))
    return examples


def two_adapter_model():
    """tiny_llama with two random LoRA adapters: "first" (r=8, q and v) and "second" (r=4, v and o), second active."""
    import lorafit

    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]), "first")
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["v_proj", "o_proj"]), "second")
    randomize_adapters(model)
    return model


@pytest.fixture
def input_ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def byte_tokenizer(chat_template=None, adds_bos=False, eos=True):
    """One token per UTF-8 byte, plus <eos> and <bos>: lengths are predictable and decoding is exact."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"], vocab["<bos>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>" if eos else None, bos_token="<bos>")
    tokenizer.chat_template = chat_template
    return tokenizer


# ChatML, as SmolLM2 uses: prefix-stable, ends each turn with <eos> then a newline.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<bos>' + message['role'] + '\\n' + message['content'] + '<eos>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<bos>assistant\\n' }}{% endif %}"
)


def write_tiny_chat_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama with a byte-level ChatML tokenizer, saved as a model folder the CLI can load."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                    bos_token_id=257, eos_token_id=256, pad_token_id=256, tie_word_embeddings=False)
    config = LlamaConfig(**{**settings, **overrides})
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def tiny_smollm(tmp_path_factory) -> Path:
    """A tiny float Llama with the embedded model's real tokenizer (tests/formats/conftest.write_tiny_smollm)."""
    from tests.formats.conftest import write_tiny_smollm

    return write_tiny_smollm(tmp_path_factory.mktemp("tiny-smollm"))


@pytest.fixture(scope="session")
def trained_default_run(tmp_path_factory) -> Path:
    """`lorafit train` with no arguments but --output (what `make demo` runs: ~3 min on 2 cores), trained once
    for the tests that need its adapter (the demo's figures, the GGUF export checked in llama.cpp)."""
    from lorafit.cli.main import main

    run = tmp_path_factory.mktemp("default-run") / "demo"
    assert main(["train", "--output", str(run)]) == 0
    return run


# Sizes that are multiples of 64: 4-bit layers with other input sizes stay float on CPU
# (lorafit.models.quantize.kept_float_on_cpu), which would leave little of the tiny models above quantized.
QUANTIZABLE = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def tiny_quantizable_chat_model(tmp_path_factory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model-64"), **QUANTIZABLE)


@contextmanager
def mounted_tmpfs(folder: Path, options: str):
    """A real tmpfs at `folder` (e.g. options "size=64k", "ro"): full disks and read-only file systems as
    the kernel reports them. Needs root; the test is skipped where no tmpfs can be mounted."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
