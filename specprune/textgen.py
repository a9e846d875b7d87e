"""English calibration text generated on this machine from the Python standard library's own
docstrings (no downloads, nothing committed). Deterministic: the same Python version gives the
same text."""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

MODULES = (
    "collections", "functools", "itertools", "json", "pathlib", "os", "re", "string", "textwrap", "argparse",
    "logging", "subprocess", "threading", "asyncio", "email", "http.client", "urllib.parse", "csv", "datetime",
    "decimal", "fractions", "statistics", "random", "heapq", "bisect", "typing", "dataclasses", "contextlib",
    "inspect", "pickle", "shutil", "tempfile", "zipfile", "tarfile", "unittest", "doctest", "difflib",
    "calendar", "socket", "selectors", "sqlite3", "xml.etree.ElementTree", "html.parser", "configparser",
    "enum", "abc", "io", "codecs", "locale", "gettext", "glob", "fnmatch", "hashlib", "hmac", "secrets",
    "base64", "struct", "array", "weakref", "copy", "pprint", "reprlib", "numbers", "math", "cmath", "operator",
    "queue", "sched", "signal", "traceback", "warnings", "timeit", "trace", "pdb", "profile", "ast", "dis",
    "tokenize", "keyword", "platform", "sysconfig", "uuid", "ipaddress", "mailbox", "mimetypes", "smtplib",
    "ftplib", "imaplib", "poplib", "wave", "colorsys", "cmd", "shlex", "optparse", "getopt", "graphlib",
    "zoneinfo", "concurrent.futures", "multiprocessing", "gzip", "bz2", "lzma", "zlib", "filecmp", "stat",
    "linecache", "pkgutil", "runpy",
)


def _docs_of(mod) -> list[str]:
    out = []
    d = inspect.getdoc(mod)
    if d:
        out.append(d)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        d = inspect.getdoc(obj)
        if d:
            out.append(d)
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if mname.startswith("_") or not callable(member):
                    continue
                d = inspect.getdoc(member)
                if d:
                    out.append(d)
    return out


def _is_prose(paragraph: str) -> bool:
    """Keep paragraphs that read as English sentences (not code samples or tables)."""
    text = paragraph.strip()
    if len(text) < 40 or text.startswith((">>>", "...", "$")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85


def generate_text(max_words: int | None = None) -> str:
    """Paragraphs of English prose from standard-library docstrings, separated by blank lines."""
    seen: set[str] = set()
    paragraphs: list[str] = []
    words = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # a module missing on some platform just contributes nothing
                continue
            for doc in _docs_of(mod):
                for para in doc.split("\n\n"):
                    para = " ".join(para.split())
                    if para in seen or not _is_prose(para):
                        continue
                    seen.add(para)
                    paragraphs.append(para)
                    words += len(para.split())
                    if max_words is not None and words >= max_words:
                        return "\n\n".join(paragraphs) + "\n"
    return "\n\n".join(paragraphs) + "\n"


def write_text(path: str | Path, max_words: int | None = None) -> Path:
    """Write :func:`generate_text` to ``path`` (UTF-8)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(generate_text(max_words), encoding="utf-8")
    return p
