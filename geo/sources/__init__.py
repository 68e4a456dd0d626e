"""The registry of dataset layouts: a new source is one module here and one line in `REGISTRY`.

Names map to `module:Class` so that listing the names (the CLI's `--source` choices) imports
nothing; a source's module is imported when it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geo.sources.base import Source

REGISTRY: dict[str, str] = {
    "sen12ms": "geo.sources.sen12ms:Sen12ms",
    "dfc2020": "geo.sources.dfc2020:Dfc2020",
    "deepglobe": "geo.sources.deepglobe:DeepGlobe",
    "folder": "geo.sources.folder:ClassFolders",
    "pairs": "geo.sources.pairs:Pairs",
}
SOURCE_NAMES: tuple[str, ...] = tuple(REGISTRY)


def source_class(name: str) -> type[Source]:
    """The class of a registered source; ValueError listing the names for an unknown one."""
    if name not in REGISTRY:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    module, _, attribute = REGISTRY[name].partition(":")
    source: type[Source] = getattr(import_module(module), attribute)
    return source


def get_source(name: str, *, classes: Path | None = None) -> Source:
    """A source as ingest's options describe it (`classes`: the pairs source's classes file)."""
    return source_class(name).configure(classes)


def index_source(metadata: Mapping[str, Any]) -> Source:
    """The source an index was built from, with the settings it stored (a pairs source's classes)."""
    return source_class(str(metadata["source"])).from_settings(metadata.get("source_settings", {}))


def as_source(source: Source | str) -> Source:
    """A source, or the source of that name with no settings (every source but pairs)."""
    return get_source(source) if isinstance(source, str) else source
