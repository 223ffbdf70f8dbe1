"""Reading a precompute result: :class:`PrecomputedIndices` maps its files, :func:`verify`
checks them against the manifest and a fresh hash.

Only the directory's own regular files are read, by name, through its descriptor: no name of
the manifest leaves it, no link is followed, no FIFO or device is opened; every .npy header,
size and offset is checked against the manifest before the data is mapped.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _engram_rs
from ..compress import CompressedTokenizer
from ..config import EngramConfig
from ..hashing import IndexDType, NgramHasher
from .files import FORMAT_VERSION, HEADER, MANIFEST, file_kind, json_kind, layer_file

__all__ = ["PrecomputedIndices", "read_manifest", "verify"]

#: The most bytes a manifest may hold (it lists the inputs, a few hundred bytes each).
MAX_MANIFEST_BYTES = 64 << 20
#: Chunk of the sequential checks and checksums over a mapped file.
_SCAN = 1 << 24


def _damaged(where: str, what: str) -> ValueError:
    return ValueError(
        f"{where}: {what}: the directory is damaged or was not written by engram_rs; rerun the "
        "precompute"
    )


def _open_own(dirfd: int, directory: str, name: str) -> int:
    """A read-only descriptor of the regular file ``name`` right in ``directory`` (open as
    ``dirfd``). Never leaves the directory, never follows a link, never blocks (a FIFO or a
    device is refused before it is read)."""
    full = os.path.join(directory, name)
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise _damaged(full, "not a file name of the directory")
    relative = os.open in os.supports_dir_fd
    target = name if relative else full
    kw: dict[str, Any] = {"dir_fd": dirfd} if relative else {}
    try:
        st = os.stat(target, follow_symlinks=False, **kw)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{full} is missing: the directory is incomplete or damaged; rerun the precompute"
        ) from None
    link = ValueError(
        f"{full} is a symbolic link: a precompute output holds its own regular files and links "
        "in it are not followed; rerun the precompute (or copy the files in with cp -L)"
    )
    if stat.S_ISLNK(st.st_mode):
        raise link
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{full} is not a regular file ({file_kind(st.st_mode)}): a precompute output "
            "holds regular files only; rerun the precompute"
        )
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(target, flags | getattr(os, "O_CLOEXEC", 0), **kw)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the stat
            raise link from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced since the stat
        os.close(fd)
        raise ValueError(f"{full} is not a regular file ({file_kind(st.st_mode)})")
    return fd


def read_manifest(dirfd: int, directory: str) -> dict[str, Any]:
    """The manifest of ``directory`` (open as ``dirfd``): a JSON object of at most
    :data:`MAX_MANIFEST_BYTES`, read through no link; a ValueError when it is not one."""
    where = os.path.join(directory, MANIFEST)
    with os.fdopen(_open_own(dirfd, directory, MANIFEST), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise _damaged(
                where, f"{size} bytes, more than a manifest holds ({MAX_MANIFEST_BYTES})"
            )
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _damaged(where, f"not JSON ({str(e)[:200]})") from None
    if not isinstance(man, dict):
        raise _damaged(where, f"not a JSON object ({json_kind(man)})")
    return man


def _count(entries: dict[str, Any], key: str, where: str) -> int:
    if key not in entries:
        raise _damaged(where, f"no {key!r} entry")
    value = entries[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _damaged(where, f"{key!r} must be an int >= 0, got {value!r}")
    return value


def _dict(entries: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    if key not in entries:
        raise _damaged(where, f"no {key!r} entry")
    value = entries[key]
    if not isinstance(value, dict):
        raise _damaged(where, f"{key!r} must be a JSON object, got {json_kind(value)}")
    return value


def _check_manifest(
    man: dict[str, Any], where: str
) -> tuple[EngramConfig, list[int], int, int, dict[str, tuple[np.dtype[Any], tuple[int, ...]]]]:
    """(config, layers, tokens, sequences, {file: (dtype, shape)}) of a manifest, each checked
    against the others; a ValueError naming the first entry that is wrong."""
    if man.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where}: manifest format {man.get('format_version')!r}, this engram_rs reads "
            f"format {FORMAT_VERSION}"
        )
    try:
        cfg = EngramConfig.from_dict(_dict(man, "config", where))
    except (TypeError, KeyError, ValueError) as e:
        if str(e).startswith(where):
            raise
        raise _damaged(where, f"its config is not valid: {e}") from None
    tokens = _count(man, "tokens", where)
    sequences = _count(man, "sequences", where)
    index_dtype = man.get("index_dtype")
    if index_dtype not in ("int32", "int64"):
        raise _damaged(where, f"'index_dtype' must be 'int32' or 'int64', got {index_dtype!r}")
    if not isinstance(man.get("flat"), bool):
        raise _damaged(where, f"'flat' must be true or false, got {man.get('flat')!r}")
    layers_entry = _dict(man, "layers", where)
    if not layers_entry:
        raise _damaged(where, "'layers' is empty")
    layers = []
    for key, entry in layers_entry.items():
        try:
            layer = int(key)
        except ValueError:
            layer = None
        if layer is None or str(layer) != key:
            raise _damaged(where, f"layer key {key!r} is not an int")
        if layer not in cfg.layer_ids:
            raise _damaged(where, f"layer {layer} is not one of its config's {list(cfg.layer_ids)}")
        named = entry.get("file") if isinstance(entry, dict) else None
        if named != layer_file(layer):
            raise _damaged(
                where,
                f"layer {layer} names the file {named!r}: a precompute writes "
                f"{layer_file(layer)!r}",
            )
        layers.append(layer)
    want: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {
        "tokens.npy": (np.dtype(np.uint32), (tokens,)),
        "offsets.npy": (np.dtype(np.int64), (sequences + 1,)),
    }
    for layer in layers:
        want[layer_file(layer)] = (np.dtype(index_dtype), (tokens, cfg.cols))
    files = _dict(man, "files", where)
    for name in files:
        if name not in want:
            raise _damaged(
                where,
                f"it names a file {name!r} that is not one of its own files (tokens.npy, "
                f"offsets.npy, {', '.join(layer_file(x) for x in layers)}): only its own files "
                "are read",
            )
    for name, (dtype, shape) in want.items():
        if name not in files:
            raise _damaged(where, f"no entry for {name!r} in 'files'")
        entry = files[name]
        if not isinstance(entry, dict):
            raise _damaged(where, f"files[{name!r}] must be a JSON object, got {json_kind(entry)}")
        got = entry.get("shape")
        if (
            not isinstance(got, list)
            or len(got) != len(shape)
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in got)
        ):
            raise _damaged(
                where, f"files[{name!r}]['shape'] must be {len(shape)} ints, got {got!r}"
            )
        if entry.get("dtype") != dtype.name:
            raise _damaged(
                where,
                f"files[{name!r}] says dtype {entry.get('dtype')!r}, a precompute writes "
                f"{dtype.name!r} there",
            )
        if tuple(got) != shape:
            if name == "tokens.npy":
                what = f"it claims {tokens} tokens, but its tokens.npy holds {got[0]}"
            elif name == "offsets.npy":
                what = (
                    f"it claims {sequences} sequences, but its offsets.npy holds {got[0]} offsets "
                    f"({sequences + 1} needed)"
                )
            else:
                what = (
                    f"files[{name!r}] says shape {tuple(got)}, its {tokens} tokens and config "
                    f"need {shape}"
                )
            raise _damaged(where, what)
    return cfg, layers, tokens, sequences, want


def _map_npy(
    dirfd: int, directory: str, name: str, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> np.ndarray:
    """The data of ``directory/name`` mapped read-only, once its header says exactly ``dtype``
    (byte order included), C order and ``shape`` and its size is exactly that of the data."""
    full = os.path.join(directory, name)
    with os.fdopen(_open_own(dirfd, directory, name), "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:  # numpy raises ValueError or a SyntaxError of its header parse
            raise _damaged(full, f"not a readable .npy file ({e})") from None
        if got != dtype:
            raise _damaged(
                full,
                f"its .npy header says dtype {got.str}, the manifest {dtype.name} ({dtype.str})",
            )
        if fortran:
            raise _damaged(full, "its .npy header says fortran_order True (column-major ids)")
        if tuple(got_shape) != shape:
            raise _damaged(
                full, f"its .npy header says shape {tuple(got_shape)}, the manifest {shape}"
            )
        offset = f.tell()
        if offset != HEADER:
            raise _damaged(full, f"its .npy header is {offset} bytes, a precompute writes {HEADER}")
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        data = os.fstat(f.fileno()).st_size - offset
        if data != need:
            raise _damaged(full, f"{data} data bytes, the manifest's shape {shape} needs {need}")
        if need == 0:
            empty = np.zeros(shape, dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)


def _check_offsets(offsets: np.ndarray, tokens: int, where: str) -> None:
    """Sequence offsets start at 0, end at ``tokens`` and never decrease (chunked: O(1) memory)."""
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise _damaged(where, f"offset 0 is {first}, not 0")
    if last != tokens:
        raise _damaged(where, f"the last offset is {last}, not the {tokens} tokens")
    n = offsets.shape[0]
    for a in range(0, n - 1, _SCAN):
        down = np.flatnonzero(np.diff(np.asarray(offsets[a : a + _SCAN + 1])) < 0)
        if down.size:
            k = a + int(down[0]) + 1
            raise _damaged(
                where,
                f"offset {k} ({int(offsets[k])}) is below offset {k - 1} "
                f"({int(offsets[k - 1])}): sequence offsets never decrease",
            )


class PrecomputedIndices:
    """A precompute result, memory-mapped: per-layer hash ids, the tokens and the sequences.

    ``idx[layer_id]`` (or ``idx.layer(layer_id)``) is the ``[tokens, cols]`` array of a layer.
    As a dataset (``len``, ``idx[i]`` with an int ``i``), an item is ``(token_ids,
    {layer_id: hash_ids})``: with ``window=T``, the ``i``-th window of ``T`` consecutive tokens
    of the stream (the last, shorter one is dropped unless ``drop_last=False``); without, the
    ``i``-th sequence. Items are numpy copies, so it works as a ``torch.utils.data.Dataset``.
    """

    def __init__(
        self, path: str | os.PathLike[str], window: int | None = None, drop_last: bool = True
    ) -> None:
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.lexists(manifest_path):
            partial = self.path.rstrip(os.sep) + ".partial"
            hint = (
                f" ({partial} holds an unfinished run: finish it with --resume)"
                if os.path.isdir(partial)
                else ""
            )
            raise FileNotFoundError(f"{self.path}: no {MANIFEST}, not a precompute output{hint}")
        # Only the directory's own regular files are read, through its descriptor: no name of
        # the manifest leaves it, no link is followed, no FIFO or device is opened.
        dirfd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            self.manifest: dict[str, Any] = read_manifest(dirfd, self.path)
            self.config, self.layer_ids, self.num_tokens, self.num_sequences, want = (
                _check_manifest(self.manifest, manifest_path)
            )
            self._files = {
                name: _map_npy(dirfd, self.path, name, dtype, shape)
                for name, (dtype, shape) in want.items()
            }
        finally:
            os.close(dirfd)
        self.tokens = self._files["tokens.npy"]
        self.offsets = self._files["offsets.npy"]
        _check_offsets(self.offsets, self.num_tokens, os.path.join(self.path, "offsets.npy"))
        self._layers = {x: self._files[layer_file(x)] for x in self.layer_ids}
        self.window = window
        self.drop_last = drop_last

    def layer(self, layer_id: int) -> np.ndarray:
        """The ``[tokens, cols]`` hash ids of one Engram layer (memory-mapped, read-only)."""
        if layer_id not in self._layers:
            raise KeyError(f"layer {layer_id} is not in this precompute (layers {self.layer_ids})")
        return self._layers[layer_id]

    def sequence(self, i: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Sequence ``i``: its tokens and each layer's hash ids (numpy copies)."""
        n = self.num_sequences
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences")
        i %= n
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._item(s, e)

    def _item(self, s: int, e: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        return np.array(self.tokens[s:e]), {x: np.array(a[s:e]) for x, a in self._layers.items()}

    def __len__(self) -> int:
        if self.window is None:
            return self.num_sequences
        full, rest = divmod(self.num_tokens, self.window)
        return full + (1 if rest and not self.drop_last else 0)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"item {i} out of range for {n} items")
        i %= n
        if self.window is None:
            return self.sequence(i)
        s = i * self.window
        return self._item(s, min(s + self.window, self.num_tokens))

    def __iter__(self) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"PrecomputedIndices({self.path!r}, tokens={self.num_tokens}, "
            f"sequences={self.num_sequences}, layers={self.layer_ids}, window={self.window})"
        )


def verify(
    path: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | None = None,
    sample: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Checks a precompute result: file sizes and shapes against the manifest, every file's
    checksum, and a re-hash of ``sample`` random sequences. Raises ValueError at the first
    mismatch; returns what was checked."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
        raise ValueError(f"sample must be an int >= 0 (sequences to re-hash), got {sample!r}")
    idx = PrecomputedIndices(path)
    man = idx.manifest
    where = os.path.join(idx.path, MANIFEST)
    # The sizes, headers, counts and offsets were checked when idx mapped the files; the
    # checksums are of the mapped data (the files idx opened, not a name opened again).
    for name, arr in idx._files.items():
        full = os.path.join(idx.path, name)
        want = man["files"][name].get("checksum")
        if not isinstance(want, str):
            raise _damaged(where, f"files[{name!r}] has no 'checksum' string")
        sum_ = _engram_rs.Checksum()
        data = arr.reshape(-1).view(np.uint8)
        for a in range(0, data.shape[0], _SCAN):
            sum_.update(data[a : a + _SCAN])
        if sum_.hexdigest() != want:
            raise ValueError(
                f"{full}: checksum {sum_.hexdigest()} differs from the manifest's "
                f"{want}: the file was changed or damaged; rerun the precompute"
            )
    about = man.get("tokenizer")
    if not isinstance(about, dict) or not isinstance(about.get("fingerprint"), str):
        raise _damaged(where, "its 'tokenizer' entry needs a 'fingerprint' string")
    if tokenizer is None and not isinstance(about.get("path"), str):
        raise _damaged(where, "its 'tokenizer' entry names no 'path': pass --tokenizer")
    tok = os.fspath(tokenizer) if tokenizer is not None else about["path"]
    if not os.path.isfile(tok):
        raise FileNotFoundError(
            f"the tokenizer {tok} named in the manifest is gone: pass --tokenizer"
        )
    comp = CompressedTokenizer.from_file(tok)
    if comp.fingerprint != man["tokenizer"]["fingerprint"]:
        raise ValueError(
            f"tokenizer {tok} (fingerprint {comp.fingerprint}) is not the one of this precompute "
            f"({man['tokenizer']['fingerprint']})"
        )
    hasher = NgramHasher.from_tokenizer(idx.config, comp)
    rng = np.random.default_rng(seed)
    picks: list[int] = (
        rng.choice(idx.num_sequences, size=min(sample, idx.num_sequences), replace=False).tolist()
        if idx.num_sequences
        else []
    )
    dtype: IndexDType = man["index_dtype"]
    boundary = man.get("boundary")
    dead_id = boundary.get("dead_id") if isinstance(boundary, dict) else None
    for i in sorted(picks):
        toks, stored = idx.sequence(i)
        fresh = hasher.hash_tokens(
            toks, layer_ids=idx.layer_ids, dtype=dtype, flat=man["flat"], dead_id=dead_id
        )
        for layer in idx.layer_ids:
            if not np.array_equal(fresh[layer], stored[layer]):
                raise ValueError(
                    f"{idx.path}: sequence {i} of layer {layer} differs from a fresh hash of its "
                    "tokens: the files are damaged or were made by another version"
                )
    return {
        "path": idx.path,
        "files": sorted(man["files"]),
        "tokens": idx.num_tokens,
        "sequences": idx.num_sequences,
        "rehashed_sequences": len(picks),
    }
