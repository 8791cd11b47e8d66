"""Files lorafit reads and writes for other tools: peft's adapter folders (both directions), which base model an
adapter folder needs, a merged transformers folder, and GGUF for llama.cpp, Ollama and LM Studio (gguf-py only).

- `peft`: adapter_config.json + adapter_model.safetensors, strict both ways;
- `adapter_base`: the base model an adapter folder records, and checking the one loaded against it;
- `merged_folder`: a merged model saved as a plain transformers folder;
- `gguf_families`: per model family, its llama.cpp architecture, layout facts and hyperparameter keys;
- `gguf_layout`: the tensor names llama.cpp uses and the layout it reads them in (rotary rows, fused q/k/v, ...);
- `gguf_lora`: an adapter as a GGUF adapter file (`general.type = adapter`);
- `gguf_merged`: the merged model, carried over from the base's own GGUF or built from a transformers folder;
- `gguf_tokenizer`: the tokenizer metadata llama.cpp needs, for a transformers folder;
- `gguf_file`: --outtype encodings, atomic writes, what `--overwrite` may replace.
"""
