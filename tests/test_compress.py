# ruff: noqa: RUF001  (look-alike letters, full-width forms and Greek sigma are the test data)
from __future__ import annotations

import json
import os
import pathlib
import re

import engram_rs as er
import numpy as np
import pytest
from engram_rs.bench import deepseek_v4_tokenizer_json
from engram_rs.reference import reference_lookup_table, reference_normalizer
from gil import assert_releases_gil
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

SPEC_EXAMPLES = {
    "ΟΔΟΣ": "οδοσ",
    "İstanbul": "istanbul",
    "Ａｐｐｌｅ": "apple",
    "ǅ": "dz",
    "ना\u0903": "न",
    "\u3000": " ",
    " Apple ": "apple",
    "\t\n": " ",
}

#: Decoded texts that exercise every normalization step: the SPEC examples, ligatures, full-width
#: forms, marks of the three categories (Mn U+0301, Mc U+093E, Me U+20DD), Greek sigma, Turkish
#: dotted and dotless i, ideographic space, NBSP, thin space, zero-width chars, the sentinel.
TEXTS = [
    *SPEC_EXAMPLES,
    *SPEC_EXAMPLES.values(),
    "Apple", "apple", " apple", "APPLE", "ﬁ", "fi", " FI", "ﬃx", "ＡＢＣ", "abc", "ｶﾞ", "ガ",
    "e\u0301", "é", "É", "\u0915\u093e", "\u0915", "a\u20dd", "a", "ς", "σ", "Σ", "ΣΑΣ",
    "İ", "i\u0307", "i", "ı", "I", "\u3000x\u3000", "\u00a0", " \u00a0", "\u00a0y", " ", "  ",
    "\u2009x\u2009", "\u200b", "\u200d", "\ufeff", "a\u200bb", "\r\n", "x\ty", "\ue000",
    " \ue000 ", "Ǆ", "ß", "ẞ", "①", "1", "㎏", "kg", "\u0085", "\u2028", "中", "中文",
]  # fmt: skip


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable char map, the alphabet of ByteLevel tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return chars


BYTE_CHARS = _byte_level_chars()


def byte_level(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return "".join(BYTE_CHARS[b] for b in raw)


def added(content: str, special: bool, normalized: bool = False) -> dict:
    return {
        "id": 0,  # ids of added tokens are assigned on load, as the tokenizers package does
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": normalized,
        "special": special,
    }


def tokenizer_json(
    model: dict, decoder: dict | None, added_tokens: list[dict], normalizer: dict | None = None
) -> str:
    return json.dumps(
        {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added_tokens,
            "normalizer": normalizer,
            "pre_tokenizer": None,
            "post_processor": None,
            "decoder": decoder,
            "model": model,
        }
    )


def vocab_of(tokens: list[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


SPECIALS = [added("<|bos|>", True), added("[PAD]", True), added("", False)]
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True}
BYTE_LEVEL["use_regex"] = True

SMALL_TOKENIZERS = {
    # Plain tokens, no decoder (decode joins the single token), an empty-string token.
    "wordlevel": tokenizer_json(
        {"type": "WordLevel", "vocab": vocab_of(["<unk>", *TEXTS, ""]), "unk_token": "<unk>"},
        None,
        SPECIALS,
    ),
    # Byte-level BPE like DeepSeek's: partial UTF-8 bytes decode to U+FFFD; an added token marked
    # normalized comes back lowercased by the tokenizer's own normalizer.
    "bytelevel-bpe": tokenizer_json(
        {
            "type": "BPE",
            "vocab": vocab_of(
                [
                    *(byte_level(t) for t in TEXTS),
                    byte_level(b"\xc3"),
                    byte_level(b"\xa9"),
                    byte_level(b"\xe4\xb8"),
                    byte_level(b"\x80"),
                    byte_level(b"a\xff"),
                ]
            ),
            "merges": [],
        },
        BYTE_LEVEL,
        [*SPECIALS, added("<MaSK>", False, normalized=True)],
        normalizer={"type": "Lowercase"},
    ),
    "wordpiece": tokenizer_json(
        {
            "type": "WordPiece",
            "vocab": vocab_of(["[UNK]", *TEXTS, *(f"##{t}" for t in TEXTS)]),
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
        },
        {"type": "WordPiece", "prefix": "##", "cleanup": True},
        SPECIALS,
    ),
    "unigram-metaspace": tokenizer_json(
        {
            "type": "Unigram",
            "unk_id": 0,
            "vocab": [[t, -1.0] for t in ["<unk>", *TEXTS, *(f"▁{t}" for t in TEXTS)]],
        },
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
        SPECIALS,
    ),
}


@pytest.fixture(scope="module")
def deepseek_path() -> str:
    return deepseek_v4_tokenizer_json()


@pytest.fixture(scope="module")
def deepseek(deepseek_path: str) -> er.CompressedTokenizer:
    return er.CompressedTokenizer.from_file(deepseek_path)


def test_deepseek_v4_matches_the_reference(deepseek_path: str, deepseek: er.CompressedTokenizer):
    tok = Tokenizer.from_file(deepseek_path)
    table, size = reference_lookup_table(tok)
    assert (deepseek.vocab_size, len(deepseek)) == (129280, 99092)
    assert (table.size, size) == (129280, 99092)
    assert deepseek.lookup_table.dtype == np.int64
    np.testing.assert_array_equal(deepseek.lookup_table, table)
    from_obj = er.CompressedTokenizer.from_tokenizer(tok)
    np.testing.assert_array_equal(from_obj.lookup_table, table)
    assert from_obj.fingerprint == deepseek.fingerprint


@pytest.mark.parametrize("name", sorted(SMALL_TOKENIZERS))
def test_small_tokenizers_match_the_reference(name: str, tmp_path: pathlib.Path) -> None:
    text = SMALL_TOKENIZERS[name]
    tok = Tokenizer.from_str(text)
    table, size = reference_lookup_table(tok)
    path = tmp_path / "tokenizer.json"
    path.write_text(text, encoding="utf-8")
    for comp in (
        er.CompressedTokenizer.from_tokenizer(tok),
        er.CompressedTokenizer.from_file(path),
    ):
        np.testing.assert_array_equal(comp.lookup_table, table)
        assert len(comp) == size
        assert comp.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    # The cases are really there: several raw ids share a key, and byte-level partial tokens keep
    # their own raw key.
    assert size < comp.vocab_size
    if name == "bytelevel-bpe":
        partial = tok.token_to_id(byte_level(b"\xc3"))
        assert "\ufffd" in tok.decode([partial], skip_special_tokens=False)
        assert tok.id_to_token(tok.token_to_id("<MaSK>")) == "<mask>"


def test_spec_examples() -> None:
    norm = reference_normalizer()
    for text, expected in SPEC_EXAMPLES.items():
        assert er.normalize(text) == expected, text
        assert norm.normalize_str(text) == expected, text
    for text in TEXTS:
        assert er.normalize(text) == norm.normalize_str(text), repr(text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=12) | st.text(alphabet="".join(TEXTS), max_size=12))
def test_normalize_matches_the_tokenizers_normalizers(text: str) -> None:
    assert er.normalize(text) == reference_normalizer().normalize_str(text)


def test_call_maps_any_shape(deepseek: er.CompressedTokenizer) -> None:
    table = deepseek.lookup_table
    ids = np.array([[0, 5, -1, 129279], [-7, 2, 3, 100000]], dtype=np.int32)
    out = deepseek(ids)
    assert out.dtype == np.int64 and out.shape == ids.shape
    expected = np.where(ids < 0, ids, table[np.clip(ids, 0, None)])
    np.testing.assert_array_equal(out, expected)
    assert deepseek(np.uint16(7)) == table[7]
    assert deepseek([]).shape == (0,)
    assert not table.flags.writeable


@pytest.mark.parametrize(
    ("ids", "value", "position"),
    [([1, 2, 129280], 129280, "(2,)"), ([[0, 1], [2**40, 5]], 2**40, "(1, 0)")],
)
def test_call_rejects_ids_past_the_vocabulary(
    deepseek: er.CompressedTokenizer, ids: list, value: int, position: str
) -> None:
    with pytest.raises(IndexError, match=re.escape(f"token id {value} at position {position} is")):
        deepseek(np.array(ids))
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        deepseek(np.array([1.0]))


def test_save_and_load(deepseek: er.CompressedTokenizer, deepseek_path: str, tmp_path) -> None:
    path = tmp_path / "deepseek.npz"
    deepseek.save(path)
    assert os.listdir(tmp_path) == ["deepseek.npz"]
    for tokenizer in (None, deepseek_path, Tokenizer.from_file(deepseek_path)):
        back = er.CompressedTokenizer.load(path, tokenizer=tokenizer)
        np.testing.assert_array_equal(back.lookup_table, deepseek.lookup_table)
        assert (len(back), back.fingerprint) == (len(deepseek), deepseek.fingerprint)
    other = Tokenizer.from_str(SMALL_TOKENIZERS["wordlevel"])
    fp = er.CompressedTokenizer.from_tokenizer(other).fingerprint
    with pytest.raises(
        ValueError,
        match=rf"built from a different tokenizer \(its fingerprint {deepseek.fingerprint}, "
        rf"this tokenizer's {fp}\)",
    ):
        er.CompressedTokenizer.load(path, tokenizer=other)
    with pytest.raises(FileNotFoundError, match="missing.npz: no such file"):
        er.CompressedTokenizer.load(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a table written by CompressedTokenizer.save"):
        er.CompressedTokenizer.load(garbage)


def test_bad_tokenizer_files(tmp_path: pathlib.Path, deepseek_path: str) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"nope/tokenizer.json: no such file"):
        er.CompressedTokenizer.from_file(missing)
    cases = {
        "invalid.json": ("{'model': 1}", r"invalid.json: not valid JSON \(key must be a string"),
        "truncated.json": (
            pathlib.Path(deepseek_path).read_text(encoding="utf-8")[:100000],
            r"truncated.json: truncated JSON \(EOF while parsing",
        ),
        "other.json": ('{"name": "engram"}', r'not an HF tokenizer \(no "model" object\)'),
        "magic.json": (
            '{"model": {"type": "MagicBPE", "vocab": {}}}',
            r'unsupported tokenizer model type "MagicBPE": supported types are BPE, WordPiece',
        ),
        "binary.json": (b"\xff\xfe\x00", "binary.json: not UTF-8 text"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            er.CompressedTokenizer.from_file(path)
        if isinstance(content, str):
            with pytest.raises(ValueError, match=message.split(": ", 1)[-1]):
                er.CompressedTokenizer.from_tokenizer(_FakeTokenizer(content))
    with pytest.raises(TypeError, match="expected a tokenizers.Tokenizer or a transformers fast"):
        er.CompressedTokenizer.from_tokenizer("tokenizer.json")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        er.CompressedTokenizer.from_file(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        er.normalize(b"x")  # type: ignore[arg-type]


class _FakeTokenizer:
    """Stands for a transformers fast tokenizer: the JSON comes from ``backend_tokenizer``."""

    def __init__(self, text: str) -> None:
        self.backend_tokenizer = self
        self._text = text

    def to_str(self) -> str:
        return self._text


def test_transformers_style_tokenizer(deepseek_path: str, deepseek: er.CompressedTokenizer):
    text = pathlib.Path(deepseek_path).read_text(encoding="utf-8")
    comp = er.CompressedTokenizer.from_tokenizer(_FakeTokenizer(text))
    np.testing.assert_array_equal(comp.lookup_table, deepseek.lookup_table)


@pytest.fixture(scope="module")
def hashers(deepseek: er.CompressedTokenizer) -> dict[str, er.NgramHasher]:
    return {
        name: er.NgramHasher.from_tokenizer(er.EngramConfig.preset(name), deepseek)
        for name in ("demo", "deepseek-v4.1-flash")
    }


def test_from_tokenizer_uses_the_compressed_vocabulary(
    deepseek: er.CompressedTokenizer, hashers: dict[str, er.NgramHasher]
) -> None:
    h = hashers["deepseek-v4.1-flash"]
    assert h.compressed_vocab_size == len(deepseek) == 99092
    assert h.pad_id == deepseek.lookup_table[2]
    assert h.vocab_size == deepseek.vocab_size
    plain = er.NgramHasher(er.EngramConfig.preset("deepseek-v4.1-flash"), 99092, pad_id=h.pad_id)
    for layer in h.layer_ids:
        np.testing.assert_array_equal(h.multipliers[layer], plain.multipliers[layer])


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["demo", "deepseek-v4.1-flash"]),
    rows=st.integers(1, 4),
    length=st.integers(0, 3000),
    dtype=st.sampled_from([np.int64, np.int32, np.uint32]),
    out=st.sampled_from([np.int64, np.int32]),
    flat=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_hash_tokens_equals_hash_of_compressed(
    hashers: dict[str, er.NgramHasher],
    deepseek: er.CompressedTokenizer,
    name: str,
    rows: int,
    length: int,
    dtype: type,
    out: type,
    flat: bool,
    seed: int,
) -> None:
    h = hashers[name]
    raw = np.random.default_rng(seed).integers(0, deepseek.vocab_size, size=(rows, length))
    raw = raw.astype(dtype)
    if out == np.int32 and flat and name == "deepseek-v4.1-flash":
        out = np.int64  # flat rows of this preset need int64
    fused = h.hash_tokens(raw, dtype=out, flat=flat)
    two_pass = h.hash(deepseek(raw), dtype=out, flat=flat)
    assert fused.keys() == two_pass.keys()
    for layer, ids in two_pass.items():
        assert fused[layer].dtype == ids.dtype
        np.testing.assert_array_equal(fused[layer], ids)
    one_row = h.hash_tokens(raw[0], layer_ids=h.layer_ids[-1], dtype=out, flat=flat)
    np.testing.assert_array_equal(one_row[h.layer_ids[-1]], two_pass[h.layer_ids[-1]][0])


def test_hash_tokens_bad_input(
    hashers: dict[str, er.NgramHasher], deepseek: er.CompressedTokenizer
) -> None:
    h = hashers["demo"]
    with pytest.raises(
        IndexError, match=r"raw token id 129280 at position \(1, 2\) is out of range \[0, 129280\)"
    ):
        h.hash_tokens(np.array([[1, 2, 3], [4, 5, 129280]]))
    with pytest.raises(IndexError, match=r"raw token id -1 at position \(0,\)"):
        h.hash_tokens(np.array([-1, 2]))
    plain = er.NgramHasher(er.EngramConfig.preset("demo"), 98627, compressed_pad_id=2)
    with pytest.raises(ValueError, match=r"build it with NgramHasher.from_tokenizer"):
        plain.hash_tokens(np.array([1, 2]))
    small = er.CompressedTokenizer(np.array([0, 1]), 2, "x")
    with pytest.raises(ValueError, match=r"config.pad_id 2 \(a raw token id\) is outside"):
        er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), small)
    with pytest.raises(TypeError, match="comp must be a CompressedTokenizer, got dict"):
        er.NgramHasher.from_tokenizer(er.EngramConfig.preset("demo"), {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lookup_table\[1\] = 5 is outside"):
        er.CompressedTokenizer(np.array([0, 5]), 2, "x")


def test_gil_is_released_while_building(deepseek_path: str) -> None:
    assert_releases_gil(lambda: er.CompressedTokenizer.from_file(deepseek_path))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["demo", "deepseek-v4.1-flash"]),
    batch=st.integers(1, 3),
    steps=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_raw_and_compressed_steps_equal_the_whole_sequence(
    hashers: dict[str, er.NgramHasher],
    deepseek: er.CompressedTokenizer,
    name: str,
    batch: int,
    steps: list[tuple[int, bool]],
    seed: int,
) -> None:
    h = hashers[name]
    total = sum(k for k, _ in steps)
    raw = np.random.default_rng(seed).integers(0, deepseek.vocab_size, size=(batch, total))
    whole = h.hash_tokens(raw)
    state = h.new_state(batch)
    start = 0
    for k, as_raw in steps:
        chunk = raw[:, start : start + k]
        out = h.hash_tokens_step(chunk, state) if as_raw else h.hash_step(deepseek(chunk), state)
        for layer in h.layer_ids:
            np.testing.assert_array_equal(out[layer], whole[layer][:, start : start + k])
        start += k
    plain = er.NgramHasher(er.EngramConfig.preset("demo"), 98627, compressed_pad_id=2)
    with pytest.raises(ValueError, match=r"build it with NgramHasher.from_tokenizer"):
        plain.hash_tokens_step(np.array([1]), plain.new_state(1))
    bad_state = h.new_state(1)
    with pytest.raises(IndexError, match=r"raw token id 129280 at position \(0,\)"):
        h.hash_tokens_step(np.array([129280]), bad_state)
    assert (bad_state.history == h.pad_id).all(), "a failed step leaves the state untouched"


def test_load_refuses_changed_tables_and_other_files(
    deepseek: er.CompressedTokenizer, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "t.npz"
    deepseek.save(path)
    with np.load(path) as z:
        fields = {k: z[k] for k in z.files}
    fields["lookup_table"] = fields["lookup_table"].copy()
    fields["lookup_table"][1000] = (fields["lookup_table"][1000] + 1) % len(deepseek)
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, **fields)
    with pytest.raises(
        ValueError, match="tampered.npz is corrupt: its lookup table does not match"
    ):
        er.CompressedTokenizer.load(tampered)
    fields["num_compressed"] = np.int64(len(deepseek) + 1)
    fields["lookup_table"] = deepseek.lookup_table
    np.savez(tampered, **fields)
    with pytest.raises(ValueError, match="is corrupt"):
        er.CompressedTokenizer.load(tampered)
    npy = tmp_path / "table.npy"
    np.save(npy, deepseek.lookup_table)
    with pytest.raises(ValueError, match=r"table.npy is not a table .* a single .npy array") as e:
        er.CompressedTokenizer.load(npy)
    assert "allow_pickle" not in str(e.value)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="a single .npy array") as e:
        er.CompressedTokenizer.load(pickled)
    assert "allow_pickle" not in str(e.value)
    js = tmp_path / "tokenizer.json"
    js.write_text('{"model": {}}')
    with pytest.raises(ValueError, match=r"it is JSON text \(a tokenizer.json\?"):
        er.CompressedTokenizer.load(js)
    old = tmp_path / "old.npz"
    np.savez(old, **{k: v for k, v in fields.items() if k != "checksum"} | {"format": np.int64(1)})
    with pytest.raises(ValueError, match="format version 1, this engram_rs reads 2"):
        er.CompressedTokenizer.load(old)


def test_save_leaves_no_temporary_file_on_failure(
    deepseek: er.CompressedTokenizer, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_savez(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left on device"):
        deepseek.save(tmp_path / "t.npz")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="the directory .* does not exist: create it first"):
        deepseek.save(tmp_path / "missing" / "t.npz")
