"""The frozen base model: loading a folder, a .gguf or the embedded default; checks before transformers reads it;
4/8-bit bases; dtypes; the identity an adapter records of its base; the options that name and load one."""
