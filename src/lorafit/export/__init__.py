"""Export to GGUF, the file format of llama.cpp, Ollama and LM Studio: an adapter llama.cpp applies with
`--lora`, or the merged model as one standalone file. Written with gguf-py only (no llama.cpp checkout).

- `layout`: which architectures, the tensor names llama.cpp uses, and its row order for q and k;
- `gguf_lora`: the adapter file (`general.type = adapter`);
- `gguf_merged`: the merged model, carried over from the base's own GGUF or built from a transformers folder;
- `tokenizer_keys`: the tokenizer metadata llama.cpp needs, for a transformers folder;
- `files`: atomic writes, and what `--overwrite` may replace.
"""
