"""Text every Python installation has: the standard library's source and the Python reference's topics.

Every Python installation already has this text, so the zoo needs no download. Files are
read at run time (never copied into the repository) and split into train and held-out by
a stable hash of their module path, so the split does not depend on the file system order.
"""

from __future__ import annotations

import ast
import hashlib
import os
import textwrap
import sysconfig
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

HELDOUT_EVERY = 10  # one module path in ten (by hash) is held out
HELDOUT_TOPICS_EVERY = 4  # one topic in four (by hash of its name) is held out
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages"}


def _is_selected(relpath: str) -> bool:
    parts = relpath.split("/")
    if any(part in SKIPPED_DIRS for part in parts[:-1]):
        return False
    name = parts[-1]
    return name.endswith(".py") and not name.startswith("test_")


def _is_heldout(relpath: str) -> bool:
    digest = hashlib.sha256(relpath.encode()).hexdigest()
    return int(digest, 16) % HELDOUT_EVERY == 0


@dataclass(frozen=True)
class Corpus:
    """The standard library's source files, split into train and held-out.

    >>> corpus = Corpus.from_stdlib()
    >>> len(corpus.train) > len(corpus.heldout) > 0
    True
    """

    root: Path
    files: tuple[str, ...]  # module paths relative to root, posix, sorted

    @classmethod
    def from_stdlib(cls, root: str | os.PathLike | None = None) -> "Corpus":
        root = Path(root or sysconfig.get_paths()["stdlib"])
        if not root.is_dir():
            raise ValueError(f"Standard library folder {root} does not exist; pass root= explicitly.")
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                relpath = name if rel_dir == "." else f"{rel_dir}/{name}"
                if _is_selected(relpath):
                    found.append(relpath)
        if not found:
            raise ValueError(f"No .py files found under {root}; is it a Python standard library?")
        return cls(root=root, files=tuple(sorted(found)))

    @property
    def train(self) -> list[str]:
        return [f for f in self.files if not _is_heldout(f)]

    @property
    def heldout(self) -> list[str]:
        return [f for f in self.files if _is_heldout(f)]

    def read(self, relpath: str) -> str:
        return (self.root / relpath).read_bytes().decode("utf-8", errors="replace")

    def texts(self, split: str) -> list[str]:
        """Texts of the "train" or "heldout" split, in module-path order."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}.")
        return [self.read(f) for f in getattr(self, split)]

    @cached_property
    def file_list_hash(self) -> str:
        """Hash of the selected module paths (what the zoo trained on, by name)."""
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()[:16]

    @cached_property
    def content_hash(self) -> str:
        """Hash of the paths and contents (differs between Python patch releases)."""
        h = hashlib.sha256()
        for relpath in self.files:
            h.update(relpath.encode() + b"\0" + (self.root / relpath).read_bytes() + b"\0")
        return h.hexdigest()[:16]


def docstring_pairs(texts: list[str], names: list[str]) -> list[dict]:
    """Instruction-style pairs from Python source: prompt = signature + docstring, response = body."""
    pairs = []
    for name, text in zip(names, texts):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            if len(node.body) < 2:
                continue
            first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            split = node.body[0].end_lineno
            source = textwrap.dedent("".join(lines[first : node.end_lineno]))
            source_lines = source.splitlines(keepends=True)
            prompt, response = "".join(source_lines[: split - first]), "".join(source_lines[split - first :])
            pairs.append({"prompt": prompt, "response": response, "source": f"{name}:{node.lineno}"})
    return pairs


def topic_is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELDOUT_TOPICS_EVERY == 0


def topic_pairs(*, heldout: bool, max_chars: int = 1200) -> list[dict]:
    """The Python reference's topics as instruction pairs: "Explain <title> in Python." -> its first paragraphs."""
    import pydoc_data.topics

    pairs = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        if topic_is_heldout(name) != heldout:
            continue
        title, _, body = text.strip().partition("\n")
        body = body.lstrip("*\n ").strip()
        cut = body.rfind("\n\n", 0, max_chars)
        response = body[: cut if cut > 200 else max_chars].strip()
        pairs.append({"prompt": f"Explain {title.strip()} in Python.\n", "response": response,
                      "source": f"pydoc_data.topics:{name}"})
    return pairs
