"""Model, dataset and tokenizer names resolved as `transformers` resolves them: an existing local
path wins, otherwise a Hub id with or without an owner (`distilgpt2`), read from the Hugging Face
cache. The cache here is laid out exactly as huggingface_hub writes one (blobs named by content,
`snapshots/<commit>/` links to them, `refs/main`), holding a tiny GPT-2 saved by `transformers`
under the id `distilgpt2`; everything runs offline (HF_HUB_OFFLINE=1).

The CLI verbs run as subprocesses with the cache in their environment, as a user runs them
(huggingface_hub and transformers read HF_HUB_CACHE and HF_HUB_OFFLINE when they are imported).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import ARXIV_DIR, ROOT
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError

from flax_gpt import pipeline
from flax_gpt.api import LM
from flax_gpt.config import DataConfig
from flax_gpt.data.sources import open_source
from flax_gpt.data.sources import resolve_source as resolve_data
from flax_gpt.data.tokenizer import load_tokenizer
from flax_gpt.errors import DataError, HFError
from flax_gpt.hub import is_hub_id
from flax_gpt.model import hf
from flax_gpt.model.gpt2 import abstract_params

torch = pytest.importorskip("torch")

REPO = "distilgpt2"  # the flagship config's model.init_from
TOKENIZER_REPO = "tiny-tokenizer"  # a bare id that is not one of the built-in GPT-2 names
TINY = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128)


def _save_tiny_model(folder: Path, seed: int, **sizes) -> dict[str, np.ndarray]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**TINY, **sizes})).eval()
    model.save_pretrained(folder)  # safetensors
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _store_in_cache(cache: Path, repo: str, files: Path) -> Path:
    """`files` as huggingface_hub stores a download of model `repo`; returns the snapshot folder."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()  # 40 hex digits, as a git commit id
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", blob))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The cache (`hub.cache`), the tiny model's snapshot and weights, and an env for subprocesses."""
    root = tmp_path_factory.mktemp("hf")
    files = root / "files"
    weights = _save_tiny_model(files, seed=0)
    load_tokenizer("gpt2").save_hf(files)
    cache = root / "home" / "hub"
    snapshot = _store_in_cache(cache, REPO, files)
    tok_files = root / "tok_files"
    load_tokenizer("gpt2").save_hf(tok_files)
    shutil.copy(files / "config.json", tok_files)  # AutoTokenizer reads the repo's model config too
    _store_in_cache(cache, TOKENIZER_REPO, tok_files)
    env = dict(os.environ, HF_HOME=str(root / "home"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("HF_TOKEN", None)
    return SimpleNamespace(cache=cache, snapshot=snapshot, weights=weights, env=env)


@pytest.fixture
def offline(hub, monkeypatch):
    """This process reading `hub.cache` offline: huggingface_hub has read its settings already."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub.cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small csv with the flagship's `abstract` column: real abstracts when the shared corpus is
    there, else plain synthetic rows."""
    path = tmp_path_factory.mktemp("corpus") / "abstracts.csv"
    sample = ARXIV_DIR / "arxiv_ml_sample500.csv"
    if sample.is_file():
        with open(sample, newline="", encoding="utf-8") as f:
            rows = [{"title": r["title"], "abstract": r["abstract"]} for _, r in zip(range(60), csv.DictReader(f))]
    else:
        rows = [{"title": f"paper {i}", "abstract": f"We study model {i} and show that it learns {i % 7} things "
                 "about gradient descent, attention and data." * 3} for i in range(60)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["title", "abstract"])
        w.writeheader()
        w.writerows(rows)
    return path


def _cli(hub, *args, cwd):
    return subprocess.run([sys.executable, "-m", "flax_gpt.cli", *map(str, args)], cwd=cwd, env=hub.env,
                          capture_output=True, text=True, timeout=900)


def _one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------ the rule itself


def test_the_rule_local_path_else_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("distilgpt2", "gpt2", "openai-community/gpt2", "wikitext", "EleutherAI/gpt-neo-1.3B"):
        assert is_hub_id(name), name
    for name in ("./distilgpt2", "~/gpt2", "/models/gpt2", "runs/a/hf", "gs://bucket/gpt2", "a--b", "x.git", ""):
        assert not is_hub_id(name), name
    (tmp_path / "distilgpt2").mkdir()
    assert not is_hub_id("distilgpt2")  # an existing local folder wins


def test_bare_hub_dataset_ids_are_sources_and_local_names_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data("wikitext") == ("hub", "wikitext")
    assert resolve_data("imdb") == ("hub", "imdb")
    for missing in ("imdb.csv", "corpus.tsv", "./imdb", "data/a/b"):
        with pytest.raises(DataError, match="path not found"):
            resolve_data(missing)
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "reviews.csv").write_text("text\ngood film\n")
    kind, files = resolve_data("imdb")
    assert kind == "files" and [Path(str(p)).name for p in files] == ["reviews.csv"]


def test_bare_hub_dataset_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match=r"Hub dataset 'wikitext' \(no local path of that name.*unreachable") as e:
        open_source(DataConfig(source="wikitext"))
    assert "\n" not in str(e.value)


def test_tokenizer_names_follow_the_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="neither a local tokenizer folder nor a Hub id"):
        load_tokenizer("./no-such-tokenizer")
    assert type(load_tokenizer("distilgpt2")).__name__ == "GPT2Tokenizer"  # built in: no download
    load_tokenizer("gpt2").save_hf(tmp_path / "distilgpt2")
    assert type(load_tokenizer("distilgpt2")).__name__ == "HFTokenizer"  # a local folder of that name wins


def test_bare_tokenizer_id_is_read_from_the_cache_offline(hub, tmp_path):
    code = ("import json; from flax_gpt.data.tokenizer import load_tokenizer as t; "
            f"a, b = t({TOKENIZER_REPO!r}), t('gpt2'); "
            "print(json.dumps([type(a).__name__, a.encode_batch(['Hub ids']), b.encode_batch(['Hub ids'])]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=hub.env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    kind, from_cache, built_in = json.loads(r.stdout.strip().splitlines()[-1])
    assert kind == "HFTokenizer" and from_cache == built_in


# ------------------------------------------------------------------------------ models, in process


def test_model_id_resolves_to_the_cached_snapshot(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hf.resolve_source(REPO).resolve() == offline.snapshot.resolve()
    with pytest.raises(HFError, match=r"model folder not found: \./distilgpt2, and it is not a Hub id"):
        hf.resolve_source("./distilgpt2")


def test_a_complete_cached_copy_is_used_without_the_network(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: pytest.fail("the cache should answer"))
    calls = []

    def snapshot_download(repo_id, **kw):
        calls.append(kw.get("local_files_only", False))
        return hf_snapshot_download(repo_id, **kw)

    hf_snapshot_download = hf.snapshot_download
    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    assert hf.resolve_source(REPO).resolve() == offline.snapshot.resolve()
    assert calls == [True]


def test_uncached_id_with_the_hub_unreachable_fails_fast(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("flax_gpt.hub.hub_reachable", lambda timeout=3.0: False)
    calls = []

    def snapshot_download(repo_id, **kw):  # what huggingface_hub raises for an id it has not cached
        calls.append(kw)
        raise LocalEntryNotFoundError(repo_id)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    with pytest.raises(HFError, match=r"model 'gpt2' is not a local folder.*while the Hugging Face Hub is "
                                      r"unreachable; download it once online") as e:
        hf.resolve_source("gpt2")
    assert "\n" not in str(e.value)
    assert [kw.get("local_files_only") for kw in calls] == [True]  # never the network's minute of retries


def test_a_local_folder_named_like_an_id_wins(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_tiny_model(tmp_path / REPO, seed=1, n_layer=1)
    cfg, _ = hf.load_hf(REPO, abstract_params)
    assert cfg.n_layer == 1  # the local folder's model, not the cached one (2 layers)
    shutil.rmtree(tmp_path / REPO)
    cfg, _ = hf.load_hf(REPO, abstract_params)
    assert cfg.n_layer == TINY["n_layer"]


def test_lm_from_hf_bare_id(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lm = LM.from_hf(REPO)
    assert Path(lm.folder).resolve() == offline.snapshot.resolve()
    wte = np.asarray(lm.model.params["wte"]["embedding"])
    np.testing.assert_array_equal(wte[: offline.weights["transformer.wte.weight"].shape[0]],
                                  offline.weights["transformer.wte.weight"])
    text = lm.generate("x", max_new_tokens=4, greedy=True)
    assert len(text) == 1 and text[0].startswith("x") and text[0] != "x"


# ------------------------------------------------------------------------------ the CLI verbs


def test_import_hf_eval_and_generate_take_a_bare_id(hub, corpus, tmp_path, monkeypatch):
    r = _cli(hub, "import-hf", REPO, "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["model"]["init_from"] == REPO and cfg["model"]["n_layer"] == TINY["n_layer"]

    # The Hub id (through the CLI) and the run imported from it (here) score the same text alike...
    r = _cli(hub, "eval", "--hf", REPO, "--data", corpus, "--seq-len", 64, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    by_id = json.loads(r.stdout.strip().splitlines()[-1])
    monkeypatch.chdir(tmp_path)
    by_run = pipeline.evaluate("run", data=str(corpus), seq_len=64)
    assert by_id["seq_len"] == by_run["seq_len"] == 64 and by_id["tokens"] == by_run["tokens"] > 0
    assert by_id["val_loss"] == pytest.approx(by_run["val_loss"], rel=1e-6)

    # ...and continue a prompt alike.
    r = _cli(hub, "generate", "--hf", REPO, "--prompt", "x", "--max-new-tokens", 4, "--greedy", "--json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    by_id = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    assert by_id == LM.from_run("run").generate("x", max_new_tokens=4, greedy=True)[0] != "x"


def test_uncached_id_offline_is_one_error_line(hub, tmp_path):
    line = _one_error_line(_cli(hub, "import-hf", "gpt2", "--out", "run", cwd=tmp_path))
    assert "'gpt2' is not a local folder" in line and "HF_HUB_OFFLINE is set" in line and str(hub.cache) in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_flagship_config_fine_tunes_the_cached_distilgpt2(hub, corpus, tmp_path):
    r = _cli(hub, "train", ROOT / "configs" / "distilgpt2_arxiv.yaml",
             *[f"model.{k}={v}" for k, v in TINY.items()], f"data.source={corpus}", "data.seq_len=64",
             "data.val_fraction=0.1", "data.shards_dir=shards", "train.run_dir=run", "train.export_dir=export",
             "train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.sample_prompts=[]",
             "train.progress=false", "checkpoint.every=0", "checkpoint.async_save=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "initialised from Hugging Face weights: distilgpt2" in r.stdout + r.stderr
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["model"]["init_from"] == REPO
    card = (tmp_path / "export" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model: distilgpt2" in front.splitlines()
