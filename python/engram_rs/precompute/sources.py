"""Readers of tokenized (and text) corpora for the offline precompute, in bounded memory.

Each input file is one of: ``.npy`` (a 1-D token stream or a 2-D ``[B, T]`` batch whose rows are
sequences), a raw token binary (``.bin``, uint16/uint32, the nanoGPT/Megatron layout), Parquet or
Arrow IPC with a list-of-int column (a tokenized HF dataset), JSONL (one record per sequence,
its text field tokenized here) or plain text (a stream, tokenized here line by line).

A reader yields :class:`~.blocks.Block` s of at most about ``chunk`` tokens from a cursor (a
small JSON dict), so that an interrupted run can continue where its last commit left it. The
Ray engine cuts the files it reads whole with the same functions (:func:`line_groups`,
:func:`row_groups`, :func:`read_arrow_ipc`, :func:`jsonl_block`), so both engines group, check
and name errors alike.

Text and JSONL inputs are read in pieces of ``4 * chunk`` bytes and each line is tokenized whole
(a tokenizer needs about 100 times a line's size), so a line may hold at most
:func:`max_line_bytes` ``(chunk)`` bytes, ``max(1 MiB, 4 * chunk)``: a longer one is refused
with its file, line and byte offset before more of it is read (raise ``--chunk-tokens`` or split
it). Invalid UTF-8, a record nested too deeply for the JSON reader and a lone surrogate in a
record's text are errors naming the file, the line and (for UTF-8) the byte offset.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

from .. import _engram_rs
from .blocks import Block, row_where, token_where

__all__ = [
    "FORMATS",
    "Source",
    "decode_lines",
    "detect_format",
    "jsonl_block",
    "line_groups",
    "list_column",
    "long_line_error",
    "max_line_bytes",
    "read_arrow_ipc",
    "row_groups",
]

#: Input formats and whether their rows are sequences ("rows") or a flat token stream ("stream").
FORMATS = {
    "npy": None,  # decided by the array's rank
    "bin": "stream",
    "parquet": "rows",
    "arrow": "rows",
    "jsonl": "rows",
    "text": "stream",
}

_SUFFIXES = {
    ".npy": "npy",
    ".bin": "bin",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".txt": "text",
    ".text": "text",
}


def detect_format(path: str, fmt: str) -> str:
    """The format of ``path``: ``fmt`` unless it is ``"auto"``, else from the suffix."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: choose auto or one of {', '.join(FORMATS)}")
        return fmt
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"{path}: cannot tell the format from the suffix {suffix!r}: pass --format "
            f"({', '.join(FORMATS)})"
        )
    return _SUFFIXES[suffix]


def _token_dtype(name: str) -> np.dtype[Any]:
    if name not in ("uint16", "uint32"):
        raise ValueError(f"token dtype must be uint16 or uint32, got {name!r}")
    return np.dtype(name)


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet
    except ImportError:
        raise ImportError(
            "reading Parquet/Arrow inputs needs pyarrow: pip install 'engram-rs[parquet]'"
        ) from None
    return pa


class Source:
    """One or more files of one format, read in order as one dataset."""

    def __init__(
        self,
        paths: list[str],
        fmt: str,
        *,
        column: str = "input_ids",
        token_dtype: str = "uint32",
        text_field: str = "text",
        tokenizer: str | None = None,
    ) -> None:
        if not paths:
            raise ValueError("no input files given")
        self.paths = [os.path.abspath(os.fspath(p)) for p in paths]
        for p in self.paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"input {p} does not exist")
            if not os.path.isfile(p):
                raise ValueError(f"input {p} is not a file")
            if os.path.getsize(p) == 0:
                raise ValueError(f"input {p} is empty (0 bytes)")
        formats = {detect_format(p, fmt) for p in self.paths}
        if len(formats) != 1:
            raise ValueError(
                f"the inputs mix formats ({', '.join(sorted(formats))}): precompute one format "
                "per run"
            )
        self.format = formats.pop()
        self.column = column
        self.text_field = text_field
        self.token_dtype = _token_dtype(token_dtype)
        #: The tokenizer.json of text inputs (and of the job).
        self.tokenizer_path = tokenizer
        self._tokenizer: Any = None
        self.kind, self.totals = self._inspect()

    # -- what the inputs hold ------------------------------------------------------------------

    def _inspect(self) -> tuple[str, list[int]]:
        """(kind, per-file progress totals): tokens for binaries, rows for row inputs, bytes for
        text inputs."""
        totals = []
        kinds = set()
        for p in self.paths:
            if self.format == "npy":
                arr = self.npy(p)
                kinds.add("stream" if arr.ndim == 1 else "rows")
                totals.append(arr.shape[0])
            elif self.format == "bin":
                size = os.path.getsize(p)
                item = self.token_dtype.itemsize
                if size % item:
                    raise ValueError(
                        f"{p}: {size} bytes is not a multiple of the token size ({item} bytes for "
                        f"{self.token_dtype}): is --token-dtype right?"
                    )
                kinds.add("stream")
                totals.append(size // item)
            elif self.format in ("parquet", "arrow"):
                kinds.add("rows")
                totals.append(self._arrow_rows(p))
            else:
                kinds.add(FORMATS[self.format] or "rows")
                totals.append(os.path.getsize(p))
        if len(kinds) != 1:
            raise ValueError(
                "the .npy inputs mix 1-D token streams and 2-D [B, T] batches: precompute them "
                "in separate runs"
            )
        return kinds.pop(), totals

    @property
    def unit(self) -> str:
        if self.format in ("npy", "bin"):
            return "tok" if self.kind == "stream" else "rows"
        return "rows" if self.format in ("parquet", "arrow") else "B"

    def describe(self) -> list[dict[str, Any]]:
        return [{"path": p, "format": self.format, "bytes": os.path.getsize(p)} for p in self.paths]

    def npy(self, path: str) -> np.ndarray:
        """The ``.npy`` input ``path``, memory-mapped and checked (1-D or 2-D integer ids)."""
        try:
            arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a readable .npy token array: {e}") from None
        if arr.dtype.kind not in "iu" or arr.ndim not in (1, 2):
            raise ValueError(
                f"{path}: a .npy input must be a 1-D token stream or a 2-D [B, T] batch of "
                f"integer ids, got a {arr.dtype} array of shape {arr.shape}"
            )
        return arr

    def _arrow_table_rows(self, path: str) -> Any:
        """A ParquetFile, or the Arrow IPC file/stream as a memory-mapped Table."""
        pa = _pyarrow()
        if self.format == "parquet":
            try:
                return pa.parquet.ParquetFile(path)
            except Exception as e:  # pyarrow raises its own ArrowInvalid
                raise ValueError(f"{path}: not a readable Parquet file: {e}") from None
        return read_arrow_ipc(lambda: pa.memory_map(path), path)

    def _arrow_rows(self, path: str) -> int:
        f = self._arrow_table_rows(path)
        schema = f.schema_arrow if self.format == "parquet" else f.schema
        names = list(schema.names)
        if self.column not in names:
            raise ValueError(
                f"{path}: no column {self.column!r} (columns: {', '.join(names)}): pass --column"
            )
        typ = schema.field(self.column).type
        pa = _pyarrow()
        is_list = pa.types.is_list(typ) or pa.types.is_large_list(typ)
        if not is_list or not pa.types.is_integer(typ.value_type):
            raise ValueError(
                f"{path}: column {self.column!r} must be a list of ints (token ids), got {typ}"
            )
        return int(f.metadata.num_rows if self.format == "parquet" else f.num_rows)

    def byte_ends(self, path: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Where the bytes of a Parquet or Arrow IPC input's rows end, for checksumming it as it
        is read: (the row after each row group / record batch, the byte after it), both
        non-decreasing; None when the rows' bytes are not known (a compressed Arrow file, whose
        batches are decompressed into new memory), or for other formats."""
        if self.format == "parquet":
            meta = self._arrow_table_rows(path).metadata
            rows, ends = [], []
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                end = 0
                for c in range(group.num_columns):
                    col = group.column(c)
                    first = col.data_page_offset
                    if col.has_dictionary_page and col.dictionary_page_offset is not None:
                        first = min(first, col.dictionary_page_offset)
                    end = max(end, int(first) + int(col.total_compressed_size))
                rows.append(int(group.num_rows))
                ends.append(end)
        elif self.format == "arrow":
            pa = _pyarrow()
            mapped = pa.memory_map(path)
            base, size = mapped.read_buffer(1).address, mapped.size()

            def start() -> Any:
                mapped.seek(0)
                return mapped

            rows, ends = [], []
            for batch in read_arrow_ipc(start, path).to_batches():
                end = 0
                for column in batch.columns:
                    for buf in column.buffers():
                        if buf is None or not buf.size:
                            continue
                        if not base <= buf.address <= base + size - buf.size:
                            return None  # not a view of the file (a compressed batch)
                        end = max(end, buf.address + buf.size - base)
                rows.append(batch.num_rows)
                ends.append(end)
        else:
            return None
        after = np.array(ends, dtype=np.int64)
        return np.cumsum(np.array(rows, dtype=np.int64)), np.maximum.accumulate(after)

    def _text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError(f"{self.format} inputs are tokenized here: pass --tokenizer")
            self._tokenizer = _engram_rs.TokenizerCore(self.tokenizer_path)
        return self._tokenizer

    # -- reading -------------------------------------------------------------------------------

    def blocks(self, cursor: dict[str, int], chunk: int) -> Iterator[Block]:
        """Blocks from ``cursor`` (``{"file": 0, "pos": 0}`` at the start) to the end."""
        for i in range(cursor["file"], len(self.paths)):
            pos = cursor["pos"] if i == cursor["file"] else 0
            reader = getattr(self, f"_read_{self.format}")
            yield from reader(i, pos, chunk)

    def _read_npy(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        path = self.paths[i]
        arr = self.npy(path)
        if arr.ndim == 1:
            yield from self._stream(i, arr, pos, chunk)
            return
        rows, length = arr.shape
        step = max(1, chunk // max(1, length))
        for r in range(pos, rows, step):
            part = _read_rows(path, arr, r, min(step, rows - r))
            n = part.shape[0]
            yield Block(
                part.reshape(-1),
                np.full(n, length, dtype=np.int64),
                {"file": i, "pos": r + n},
                row_where(path, np.full(n, length, dtype=np.int64), r),
                n,
            )

    def _read_bin(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        arr = np.memmap(self.paths[i], dtype=self.token_dtype, mode="r")
        yield from self._stream(i, arr, pos, chunk)

    def _stream(self, i: int, arr: np.ndarray, pos: int, chunk: int) -> Iterator[Block]:
        path = self.paths[i]
        for start in range(pos, arr.shape[0], chunk):
            part = _read_rows(path, arr, start, min(chunk, arr.shape[0] - start))
            yield Block(
                part,
                None,
                {"file": i, "pos": start + part.shape[0]},
                token_where(path, start),
                part.shape[0],
            )

    def _read_parquet(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        yield from self._read_arrow_rows(i, pos, chunk)

    def _read_arrow(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        yield from self._read_arrow_rows(i, pos, chunk)

    def _read_arrow_rows(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        path = self.paths[i]
        f = self._arrow_table_rows(path)
        if self.format == "parquet":
            batches = f.iter_batches(batch_size=4096, columns=[self.column])
        else:
            batches = iter(f.select([self.column]).to_batches(max_chunksize=4096))
        for tokens, lengths, first, end in row_groups(batches, path, self.column, pos, chunk):
            yield Block(
                tokens,
                lengths,
                {"file": i, "pos": end},
                row_where(path, lengths, first),
                end - first,
            )

    def _lines(self, i: int, pos: int, chunk: int) -> Iterator[tuple[list[str], int, int, int]]:
        """(lines, byte offset of the first, byte offset after the last, line number of the
        first counted from 0, or -1 when unknown) of :func:`line_groups`, decoded."""
        path = self.paths[i]
        with open(path, "rb") as f:
            for raw, start, end, number in line_groups(f, path, pos, chunk):
                yield decode_lines(raw, path, number, start), start, end, number

    def _read_text(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        tok = self._text_tokenizer()
        path = self.paths[i]
        for lines, start, end, _ in self._lines(i, pos, chunk):
            ids, _lens = tok.encode_batch(lines, False)
            yield Block(
                ids,
                None,
                {"file": i, "pos": end},
                token_where(f"{path} (the lines from byte {start} on)", 0),
                end - start,
            )

    def _read_jsonl(self, i: int, pos: int, chunk: int) -> Iterator[Block]:
        tok = self._text_tokenizer()
        path = self.paths[i]
        for lines, start, end, number in self._lines(i, pos, chunk):
            block = jsonl_block(tok, lines, self.text_field, path, start, number)
            block.cursor, block.units = {"file": i, "pos": end}, end - start
            yield block


def max_line_bytes(chunk: int) -> int:
    """The longest line (its bytes, the newline included) a text or JSONL input may hold with
    ``chunk_tokens=chunk``: ``max(1 MiB, 4 * chunk)`` (``--chunk-tokens`` 2**18: 1 MiB). A
    tokenizer needs about 100 times a line's size in memory, and a line is tokenized whole."""
    return max(1 << 20, 4 * chunk)


def _line_name(path: str, number: int, offset: int) -> str:
    if number >= 0:
        return f"{path}, line {number + 1} (from byte {offset})"
    return f"{path}, the line from byte {offset}"


def long_line_error(path: str, number: int, offset: int, limit: int, chunk: int) -> ValueError:
    """The error for a line longer than ``limit`` bytes (number counted from 0, -1: unknown)."""
    return ValueError(
        f"{_line_name(path, number, offset)}: longer than {limit} bytes, the most a line may "
        f"hold with --chunk-tokens {chunk} (4 bytes a token, at least 1 MiB; a line is "
        "tokenized whole): split it into shorter lines or records, or raise --chunk-tokens"
    )


def line_groups(
    f: BinaryIO, path: str, pos: int, chunk: int
) -> Iterator[tuple[list[bytes], int, int, int]]:
    """The lines of ``f`` (``path``, read from byte ``pos``), split at b"\\n" only, in groups of
    about ``4 * chunk`` bytes read in pieces of that size: (the lines, byte offset of the first,
    byte offset after the last, line number of the first counted from 0, or -1 when unknown:
    ``pos`` is not 0). A line longer than :func:`max_line_bytes` is refused before more of it is
    read, so memory stays bounded by ``chunk`` whatever the lines. Both engines read text and
    JSONL with it (the Ray engine from the bytes of a whole file)."""
    budget = min(max(1 << 16, 4 * chunk), 1 << 30)
    limit = max_line_bytes(chunk)
    f.seek(pos)
    offset = pos  # file offset of rest[0]
    number = 0 if pos == 0 else -1
    rest = b""
    while True:
        data = f.read(budget)
        buf = rest + data if rest else data
        if not buf:
            return
        cut = buf.rfind(b"\n") + 1 if data else len(buf)
        if cut == 0:  # no end of line yet: the first line goes on
            if len(buf) > limit:
                raise long_line_error(path, number, offset, limit, chunk)
            rest = buf
            continue
        group, rest = buf[:cut], buf[cut:]
        raw = io.BytesIO(group).readlines()
        if max(map(len, raw)) > limit:  # the first problem in file order is the one named
            at = offset
            for k, x in enumerate(raw):
                if len(x) > limit:
                    decode_lines(raw[:k], path, number, offset)
                    raise long_line_error(path, -1 if number < 0 else number + k, at, limit, chunk)
                at += len(x)
        yield raw, offset, offset + cut, number
        offset += cut
        if number >= 0:
            number += len(raw)


def decode_lines(raw: list[bytes], path: str, number: int, offset: int) -> list[str]:
    """The UTF-8 text of ``raw`` lines, the first at byte ``offset``, line ``number`` (from 0,
    -1: unknown); invalid UTF-8 is a ValueError naming its line and its byte offset in the file."""
    try:
        return [x.decode("utf-8") for x in raw]
    except UnicodeDecodeError:
        pass
    at = offset
    for k, x in enumerate(raw):
        here = -1 if number < 0 else number + k
        try:
            x.decode("utf-8")
        except UnicodeDecodeError as e:
            line = f"line {here + 1}, " if here >= 0 else ""
            raise ValueError(
                f"{path}, {line}byte {at + e.start}: not UTF-8 text ({e.reason}): text and JSONL "
                "inputs must be UTF-8"
            ) from None
        at += len(x)
    raise AssertionError("unreachable")  # pragma: no cover


def jsonl_block(
    tokenizer: Any, lines: list[str], text_field: str, path: str, start: int, first_line: int
) -> Block:
    """The tokenized records of JSONL ``lines`` (read from byte ``start``, line ``first_line``
    counted from 0, or -1 if unknown): one sequence per non-blank line, its ``text_field``
    encoded as ``Tokenizer.encode(text)`` does (special tokens included)."""

    def here(k: int) -> str:
        if first_line >= 0:
            return f"{path}, line {first_line + k + 1}"
        return f"{path}, byte {start + sum(len(x.encode('utf-8')) for x in lines[:k])}"

    texts = []
    index = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{here(k)}: not JSON: {e}") from None
        except RecursionError:
            raise ValueError(
                f"{here(k)}: a record nested too deeply for Python's JSON reader: each line "
                f"must be a JSON object with a string field {text_field!r}"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise ValueError(
                f"{here(k)}: a record needs a string field {text_field!r} (--text-field names it)"
            )
        texts.append(record[text_field])
        index.append(k)
    try:
        ids, lens = tokenizer.encode_batch(texts, True)
    except UnicodeEncodeError:
        for k, text in zip(index, texts, strict=True):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(
                    f"{here(k)}: field {text_field!r} holds a lone surrogate "
                    f"({text[e.start]!a} at character {e.start}), which is not Unicode text: "
                    "fix the record (a \\u escape of half a UTF-16 pair)"
                ) from None
        raise
    lengths = lens.astype(np.int64)
    where = row_where(f"{path} (the records from byte {start})", lengths, 0)
    return Block(ids, lengths, {}, where, 0)


def read_arrow_ipc(open_input: Callable[[], Any], path: str) -> Any:
    """The Arrow IPC file or stream that ``open_input()`` opens (a memory map of the file, or a
    buffer of its bytes), as a Table."""
    pa = _pyarrow()
    errors = []
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            return opener(open_input()).read_all()
        except Exception as e:  # pyarrow raises its own ArrowInvalid
            errors.append(str(e))
    raise ValueError(f"{path}: not a readable Arrow IPC file or stream: {errors[-1]}")


def row_groups(
    batches: Iterator[Any], path: str, column: str, pos: int, chunk: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Groups of about ``chunk`` tokens of the rows from row ``pos`` on of Arrow record
    ``batches`` holding the list-of-int ``column``: (the token ids end to end, each row's count,
    the first row, the row after the last). Both engines read Parquet/Arrow rows with it."""
    row = 0
    pending: list[np.ndarray] = []
    pending_lengths: list[np.ndarray] = []
    first = pos
    count = 0
    for batch in batches:
        col = batch.column(batch.schema.get_field_index(column))
        n = len(col)
        if row + n <= pos:
            row += n
            continue
        skip = max(0, pos - row)
        col = col.slice(skip)
        row += skip
        values, lengths = list_column(col, path, column, row)
        pending.append(values)
        pending_lengths.append(lengths)
        row += len(col)
        count += values.shape[0]
        if count >= chunk:
            yield np.concatenate(pending), np.concatenate(pending_lengths), first, row
            pending, pending_lengths, first, count = [], [], row, 0
    if pending:
        yield np.concatenate(pending), np.concatenate(pending_lengths), first, row


def list_column(col: Any, path: str, column: str, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The token ids of an Arrow list-of-int column chunk whose first row is ``row``, end to
    end, and each row's count; a null row or id is a ValueError naming the file and row."""
    if col.null_count:
        k = next(j for j in range(len(col)) if not col[j].is_valid)
        raise ValueError(
            f"{path}, row {row + k}: column {column!r} is null: every row needs a list of token "
            "ids (an empty list for an empty sequence)"
        )
    offsets = np.asarray(col.offsets)
    inner = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    if inner.null_count:
        raise ValueError(
            f"{path}, rows {row}..{row + len(col) - 1}: column {column!r} holds a null token id"
        )
    return np.asarray(inner), np.diff(offsets).astype(np.int64)


def _read_rows(path: str, arr: np.ndarray, start: int, count: int) -> np.ndarray:
    """Rows ``start:start + count`` of a memory-mapped array, read with a plain file read: the
    process never maps the input, so its memory does not grow with the corpus."""
    offset = getattr(arr, "offset", None)
    if offset is None or not arr.flags.c_contiguous:
        return np.array(arr[start : start + count])
    row = int(np.prod(arr.shape[1:], dtype=np.int64)) if arr.ndim > 1 else 1
    flat = np.fromfile(
        path, dtype=arr.dtype, count=count * row, offset=offset + start * row * arr.itemsize
    )
    return flat.reshape((count, *arr.shape[1:]))
