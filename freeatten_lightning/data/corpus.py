"""The embedded default corpus: English prose that ships with Python, so a fresh machine can train offline.

It is the reference documentation topics of `pydoc_data` (sorted by key) followed by the long docstrings of
the standard library's modules (sorted by path), one document per topic and one per source file.
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import sysconfig
import warnings
from pathlib import Path

from tqdm import tqdm

MIN_DOCSTRING_CHARS = 200
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "lib2to3", "site-packages", "__pycache__"})
_DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def embedded_corpus_id() -> str:
    """The embedded corpus's name for this Python version (e.g. "python-3.11.7-docs"), for cache folders."""
    return f"python-{platform.python_version()}-docs"


def _stdlib_sources() -> list[Path]:
    """The standard library's .py files, sorted by relative path, without tests and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_FOLDERS]
        found.extend(Path(folder) / name for name in files if name.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _file_docstrings(path: Path) -> str | None:
    """The docstrings of at least MIN_DOCSTRING_CHARS in one source file, in source order, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCSTRING_NODES):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append((getattr(node, "lineno", 0), doc))
    return "\n\n".join(doc for _, doc in sorted(docs)) or None


@functools.lru_cache(maxsize=1)
def _embedded_documents() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    for path in tqdm(_stdlib_sources(), desc="reading Python's docstrings", unit="file", leave=False):
        text = _file_docstrings(path)
        if text:
            documents.append(text)
    return tuple(documents)


def embedded_documents() -> list[str]:
    """The embedded corpus as documents (deterministic for a given Python install; about 1.7 MB on 3.11)."""
    return list(_embedded_documents())
