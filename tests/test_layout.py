"""The package's shape, held as rules: folders are layers that import downward only, the top level holds the
public API and a few shared leaves, no file grows past 400 lines nor a function past 70, and method names are
written in the registry's files only. These read the source (ast); nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorafit"

# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = ["leaves", "core", "models", "methods", "formats", "data", "train", "planner", "inference", "recipes", "cli"]
LEAVES = {"errors", "files", "heap", "version"}
TOP_LEVEL = {"__init__.py", "__main__.py"} | {f"{name}.py" for name in LEAVES}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 70


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _layer(dotted: str) -> str | None:
    """The layer of a module `lorafit.x.y` (None for the package's own __init__/__main__: the public API)."""
    parts = dotted.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return None
    return "leaves" if parts[1] in LEAVES else parts[1]


def _dotted(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _lorafit_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("lorafit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lorafit"):
            found.append((node.lineno, node.module))
    return found


def test_the_top_level_holds_the_public_api_and_the_shared_leaves_only():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == TOP_LEVEL
    assert folders == set(LAYERS) - {"leaves"}


def test_layers_import_downward_only():
    wrong = []
    for path in _modules():
        importer = _layer(_dotted(path))
        if importer is None:
            continue  # lorafit/__init__.py re-exports from every layer; __main__ runs the CLI
        for line, module in _lorafit_imports(ast.parse(path.read_text(encoding="utf-8"))):
            imported = _layer(module)
            if imported is not None and LAYERS.index(imported) > LAYERS.index(importer):
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({importer}) imports {module} ({imported})")
    assert not wrong, "\n".join(wrong)


def test_no_file_over_400_lines_and_no_function_over_70():
    long_files, long_functions = [], []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(PACKAGE)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)


# Where a method may be named by its --method spelling: its own files and the registry. Elsewhere a string equal
# to a method's name means code that decides per method, which belongs in what the method declares.
METHOD_NAMES = {"lora", "dora", "ia3", "bitfit"}
MAY_NAME_METHODS = ("methods/", "core/registry.py")
# llama.cpp's own value of its adapter.type key, not a lorafit method
NOT_A_METHOD = {("formats/gguf_lora.py", "lora")}


def test_only_the_registry_and_the_methods_name_methods():
    import lorafit.methods  # noqa: F401  (the built-in registrations)
    from lorafit.core.registry import spellings

    assert METHOD_NAMES <= set(spellings())
    found = []
    for path in _modules():
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith(MAY_NAME_METHODS):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and value.lower() in METHOD_NAMES and (where, value) not in NOT_A_METHOD:
                found.append(f"{where}:{node.lineno} {value!r}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("layer", [name for name in LAYERS if name != "leaves"])
def test_every_folder_says_what_it_holds(layer):
    docstring = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text(encoding="utf-8")))
    assert docstring and len(docstring) > 40


# `import lorafit`'s names: the public API, the same before and after the package was laid out in folders.
PUBLIC_API = ['ALL_LINEAR', 'BitFitConfig', 'FusedSlices', 'IA3Config', 'LoraConfig', 'LorafitError', 'ParameterCount',
              'QuantizeSettings', 'active_adapters', 'adapter_names', 'adapter_per_row', 'attach', 'delete_adapter',
              'dequantize_model', 'disable_adapters', 'load_adapter', 'load_model_and_tokenizer', 'merge',
              'merge_and_unload', 'quantize_model', 'report', 'save_adapter', 'set_active_adapter',
              'trainable_parameters', 'unload', 'unmerge']


def test_the_public_api_is_unchanged_and_every_name_resolves():
    import lorafit

    assert lorafit.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(lorafit, name) is not None
