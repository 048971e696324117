"""GPT-2 tokenizer: the tiktoken fast path gives exactly transformers' GPT-2 ids (offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.data import tokenizer as tokenizer_mod
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import DataError

ARXIV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arxiv"
SAMPLE = ARXIV / "arxiv_ml_sample500.csv"

TRICKY = [
    "Hello world",
    "héllo wörld — naïve café, Ünïcödé; 日本語のテキスト; Ελληνικά; русский текст",
    "emoji 🤖👍🏽 🧑‍🔬 flags 🇫🇷 and ZWJ",
    "multiple    spaces   here  ",
    "   leading spaces and trailing\t\ttabs\t",
    "new\nlines\n\n\nand\r\nCRLF\n",
    "literal <|endoftext|> in the middle and <|endoftext|>",
    "<|endoftext|>",
    "contractions: it's, we'll, I'm, they've, she'd, you're, DON'T",
    "numbers 3.14159 1e-5 2025 ١٢٣ and code: x[i] += f(y) // {a: b}",
    "  ",
    "\n",
    "a",
    "math $\\mathcal{O}(n^2)$ and \\textbf{bold} ∑∫√∞≈≠",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def hf_tok(tok):
    return tok.hf()


def sample_texts() -> list[str]:
    if not SAMPLE.is_file():
        pytest.skip("shared arxiv corpus not present")
    with open(SAMPLE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["title"] + "\n" + r["abstract"] for r in rows]


def hf_ids(hf, texts):
    # split_special_tokens: treat "<|endoftext|>" in text as text, like our encode_batch does.
    return hf(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_gpt2_constants_match_the_package_files(tok):
    encoder = json.loads(tokenizer_mod.gpt2_files()[0].read_text(encoding="utf-8"))
    assert (tok.vocab_size, tok.eos_id) == (len(encoder), encoder["<|endoftext|>"]) == (50257, 50256)
    assert load_tokenizer("distilgpt2").fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64


def test_known_ids(tok):
    # GPT-2 ids documented in transformers' GPT2Tokenizer docstring.
    assert tok.encode_batch(["Hello world", " Hello world"]) == [[15496, 995], [18435, 995]]


def test_tricky_strings_match_transformers(tok, hf_tok):
    ours = tok.encode_batch(TRICKY)
    assert ours == hf_ids(hf_tok, TRICKY)
    # The literal is plain text for us: never the EOS id.
    assert all(tok.eos_id not in ids for ids in ours)
    # ...whereas transformers' default call would parse it as the special token.
    assert tok.eos_id in hf_tok("a <|endoftext|> b", add_special_tokens=False)["input_ids"]


def test_sample500_matches_transformers(tok, hf_tok):
    texts = sample_texts()
    assert tok.encode_batch(texts) == hf_ids(hf_tok, texts)


@pytest.mark.parametrize("text", TRICKY)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode_batch([text])[0]) == text


def test_encode_concat_equals_per_document_ids_plus_eos(tok):
    texts = TRICKY[:6] + ["short", "x" * 5000 + " end"]
    flat, lengths = tok.encode_concat(texts)
    expected = [ids + [tok.eos_id] for ids in tok.encode_batch(texts)]
    assert flat.tolist() == [i for ids in expected for i in ids]
    assert lengths.tolist() == [len(ids) for ids in expected]
    # A document holding the literal forces the per-document fallback: same contract.
    flat2, lengths2 = tok.encode_concat(TRICKY)
    expected2 = [ids + [tok.eos_id] for ids in tok.encode_batch(TRICKY)]
    assert flat2.tolist() == [i for ids in expected2 for i in ids]
    assert lengths2.tolist() == [len(ids) for ids in expected2]


def test_encode_concat_on_sample_matches_transformers(tok, hf_tok):
    texts = sample_texts()
    flat, lengths = tok.encode_concat(texts)
    expected = np.concatenate([np.array(ids + [tok.eos_id]) for ids in hf_ids(hf_tok, texts)])
    np.testing.assert_array_equal(flat, expected)
    assert int(lengths.sum()) == flat.size


def test_save_hf_folder_loads_with_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    out = tok.save_hf(tmp_path / "tok")
    names = {p.name for p in out.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.eos_id
    assert hf("Hello world")["input_ids"] == [15496, 995]  # not an empty tokenizer
    assert hf_ids(hf, TRICKY) == tok.encode_batch(TRICKY)
    assert hf.decode(tok.encode_batch([TRICKY[2]])[0]) == TRICKY[2]


def test_hf_folder_tokenizer_path(tok, tmp_path):
    folder = tok.save_hf(tmp_path / "tok")
    other = load_tokenizer(str(folder))
    assert type(other).__name__ == "HFTokenizer"
    assert (other.vocab_size, other.eos_id) == (tok.vocab_size, tok.eos_id)
    assert other.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    flat, lengths = other.encode_concat(TRICKY[:3])
    flat_ref, lengths_ref = tok.encode_concat(TRICKY[:3])
    assert flat.tolist() == flat_ref.tolist() and lengths.tolist() == lengths_ref.tolist()
    assert other.decode(tok.encode_batch([TRICKY[1]])[0]) == TRICKY[1]
    assert other.fingerprint != tok.fingerprint  # different files (tokenizer.json etc.) hashed


def test_unreachable_hub_tokenizer_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="unreachable.*data.tokenizer=gpt2"):
        load_tokenizer("someone/some-tokenizer")
    with pytest.raises(DataError, match="empty"):
        load_tokenizer("  ")
