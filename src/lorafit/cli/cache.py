"""`lorafit cache`: where lorafit keeps what it can rebuild (converted GGUF models, prepared data), how big it is,
and `--clear-data` to remove the prepared data (only entries lorafit wrote; anything else there is refused)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class CacheConfig:
    """Show lorafit's cache folders and their sizes; --clear-data removes the prepared (tokenised) data."""

    clear_data: bool = False
    """Remove every prepared-data entry (a later run prepares its data again)."""


def run(config: CacheConfig, echo=print, given=None) -> dict:
    from lorafit.data.prepared_store import clear_data_cache, data_cache_dir
    from lorafit.models.gguf_cache import model_cache_dir

    folders = {"models (converted .gguf files)": model_cache_dir(), "data (prepared, tokenised data)": data_cache_dir()}
    sizes = {}
    for what, folder in folders.items():
        entries, size = _usage(folder)
        sizes[what] = size
        echo(f"{what}: {folder} — {entries} entr{'y' if entries == 1 else 'ies'}, {size / 2**20:,.1f} MiB")
    if config.clear_data:
        entries, freed = clear_data_cache()
        echo(f"cleared the prepared data: {entries} entr{'y' if entries == 1 else 'ies'}, {freed / 2**20:,.1f} MiB")
    return sizes


def _usage(folder: Path) -> tuple[int, int]:
    if not folder.is_dir():
        return 0, 0
    entries = [entry for entry in folder.iterdir() if entry.is_dir()]
    return len(entries), sum(path.stat().st_size for entry in entries for path in entry.rglob("*") if path.is_file())
