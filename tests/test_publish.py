"""Model card and Hub push, up to the network boundary.

The Hub is replaced by a stand-in HTTP server on 127.0.0.1 that speaks the endpoints
`huggingface_hub` calls for `create_repo`, `create_branch` and `upload_folder`:
  POST /api/repos/create                         -> {"url": ...}
  POST /api/models/{repo}/branch/{branch}        -> {}
  POST /api/models/{repo}/preupload/{revision}   -> every file "regular" (inline in the commit)
  POST /api/models/{repo}/commit/{revision}      -> ndjson commit; files decoded and stored
  POST /api/validate-yaml                        -> no errors (legacy upload path without hf_xet)
It answers every file as a regular (base64-in-commit) upload, so the LFS/Xet blob-storage
protocol is NOT exercised, nor are real authentication, permissions or quotas.
"""

from __future__ import annotations

import base64
import http.server
import json
import math
import socket
import threading
from pathlib import Path

import pytest
import yaml

from flax_gpt.config_files import build_config
from flax_gpt.errors import HFError
from flax_gpt.export.card import model_card
from flax_gpt.export.hub import push_to_hub
from flax_gpt.train.run_dir import RunDir

SECRET = "hf_standInSecretToken0123456789abcdef"


class _Hub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {rev: {path: bytes}}}
        self.auth: list[str] = []
        self.unexpected: list[str] = []


def _handler(hub: _Hub, base_url: list[str]):
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):  # keep the server quiet (it would otherwise print request lines)
            pass

        def _reply(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub.auth.append(self.headers.get("Authorization", ""))
            if not self.headers.get("Authorization"):
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            path = self.path.split("?")[0]
            parts = path.strip("/").split("/")
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}"
                hub.repos.setdefault(repo_id, {"private": req.get("visibility") == "private",
                                               "branches": {"main": {}}})
                return self._reply(200, {"url": f"{base_url[0]}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                yaml.safe_load(json.loads(body)["content"].split("---")[1])
                return self._reply(200, {"errors": [], "warnings": []})
            if len(parts) == 6 and parts[:2] == ["api", "models"]:
                repo_id, verb, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._reply(404, {"error": "Repository not found"})
                if verb == "branch":
                    repo["branches"].setdefault(rev, dict(repo["branches"]["main"]))
                    return self._reply(200, {})
                if verb == "preupload":
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                             for f in json.loads(body)["files"]]
                    return self._reply(200, {"files": files, "commitOid": "0" * 40})
                if verb == "commit":
                    if rev not in repo["branches"]:
                        return self._reply(404, {"error": f"Invalid rev id: {rev}"})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            assert v["encoding"] == "base64"
                            repo["branches"][rev][v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] != "header":
                            hub.unexpected.append(f"commit item {item['key']}")
                    return self._reply(200, {"commitUrl": f"{base_url[0]}/{repo_id}/commit/{'1' * 40}",
                                             "commitOid": "1" * 40})
            hub.unexpected.append(f"POST {self.path}")
            return self._reply(404, {"error": "not served by the stand-in"})

        def do_GET(self):
            hub.unexpected.append(f"GET {self.path}")
            return self._reply(404, {"error": "not served by the stand-in"})

    return H


@pytest.fixture
def hub_server():
    hub, base = _Hub(), [""]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, base))
    base[0] = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, base[0]
    finally:
        server.shutdown()
        server.server_close()


def _export_folder(tmp_path: Path) -> Path:
    """A small stand-in for an export: what matters here is which bytes arrive, not the model."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n# card\n")
    return folder


def test_push_uploads_every_file_and_never_shows_the_token(tmp_path, hub_server, monkeypatch, capfd, caplog):
    hub, endpoint = hub_server
    folder = _export_folder(tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)  # the standard env route, not an argument
    caplog.set_level("DEBUG")
    url = push_to_hub(folder, "alice/tiny-gpt", private=True, endpoint=endpoint)

    assert url == f"{endpoint}/alice/tiny-gpt"
    repo = hub.repos["alice/tiny-gpt"]
    assert repo["private"] is True
    local = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert repo["branches"]["main"] == local
    assert hub.unexpected == []
    assert hub.auth and all(a == f"Bearer {SECRET}" for a in hub.auth)  # the token was sent...
    out, err = capfd.readouterr()
    assert SECRET not in out + err + caplog.text  # ...and never printed or logged


def test_push_to_a_branch_creates_it_and_leaves_main_alone(tmp_path, hub_server):
    hub, endpoint = hub_server
    folder = _export_folder(tmp_path)
    url = push_to_hub(folder, "alice/tiny-gpt", revision="step-100", token=SECRET, endpoint=endpoint)
    assert url.endswith("/alice/tiny-gpt/tree/step-100")
    branches = hub.repos["alice/tiny-gpt"]["branches"]
    assert set(branches["step-100"]) == {"config.json", "model.safetensors", "README.md"}
    assert branches["main"] == {}
    assert hub.repos["alice/tiny-gpt"]["private"] is False


def test_push_without_a_token_says_how_to_log_in(tmp_path, hub_server, monkeypatch):
    hub, endpoint = hub_server
    folder = _export_folder(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))  # no stored login either
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "empty_hf_home" / "token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(tmp_path / "empty_hf_home" / "stored_tokens"))
    with pytest.raises(HFError) as info:
        push_to_hub(folder, "alice/tiny-gpt", endpoint=endpoint)
    msg = str(info.value)
    assert msg.startswith("the Hugging Face Hub refused the push to alice/tiny-gpt") and "401" in msg
    assert "HF_TOKEN" in msg and "\n" not in msg
    assert hub.repos == {}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_one_line_and_keeps_the_folder(tmp_path, capfd):
    folder = _export_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(HFError) as info:
        push_to_hub(folder, "alice/tiny-gpt", token=SECRET, endpoint=f"http://127.0.0.1:{_closed_port()}")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("could not reach the Hugging Face Hub to push alice/tiny-gpt")
    assert str(folder) in msg and "kept" in msg
    assert SECRET not in msg + "".join(capfd.readouterr())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cli_export_push_error_is_one_line(tmp_path, capfd, monkeypatch):
    """`flax-gpt export --push-to-hub` surfaces a Hub failure as `error: ...` and exit 2."""
    import flax_gpt.cli as cli
    import flax_gpt.export.hf_folder as hf_folder

    folder = _export_folder(tmp_path)
    monkeypatch.setattr(hf_folder, "export_run", lambda *a, **k: (folder, 0.0))
    import huggingface_hub.constants as hc

    # HF_ENDPOINT is read when huggingface_hub is imported; patch the value it was read into.
    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    rc = cli.main(["export", "RUN", "--out", str(folder), "--push-to-hub", "alice/x"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: could not reach the Hugging Face Hub to push alice/x")


# ------------------------------------------------------------------------------- model card


def _run_dir(tmp_path: Path, **data) -> tuple[Path, object]:
    run = tmp_path / "run"
    run.mkdir()
    cfg = build_config({"data": {"shards_dir": str(tmp_path / "shards"), **data},
                        "train": {"run_dir": str(run), "batch_size": 16, "steps": 300},
                        "optim": {"learning_rate": 3e-4, "warmup_steps": 20}})
    lines = [{"step": 100, "loss": 5.0}, {"step": 100, "val_loss": 4.5},
             {"step": 300, "loss": 3.9}, {"step": 300, "val_loss": 3.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run, cfg


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_synthetic_run(tmp_path):
    run, cfg = _run_dir(tmp_path)
    card = model_card(RunDir(run), cfg, 300, {"tokens_seen": 1_228_800})
    fm = _front_matter(card)
    assert fm["library_name"] == "transformers" and fm["pipeline_tag"] == "text-generation"
    assert "license" in fm and "gpt2" in fm["tags"] and "synthetic-data" in fm["tags"]
    assert "datasets" not in fm  # a synthetic corpus is no Hub dataset
    assert "**The corpus is synthetic**" in card
    assert "Tokens seen: 1,228,800" in card
    assert "Final validation loss: 3.0000 (at step 300)" in card  # the last eval line, not the first
    assert f"Validation perplexity: {math.exp(3.0):.2f}" in card
    assert "| sequence length | 256 |" in card and "| batch size (sequences) | 16 |" in card
    assert "3e-04" in card or "0.0003" in card
    assert 'pipeline("text-generation", model=' in card


def test_model_card_hub_dataset_and_manifest(tmp_path):
    run, cfg = _run_dir(tmp_path, source="CShorten/ML-ArXiv-Papers")
    (tmp_path / "shards").mkdir()
    manifest = {"format_version": 3, "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eos_id": 50256,
                                                   "fingerprint": "f"},
                "seq_len": 256, "dtype": "uint16", "packing": "pack", "fingerprint": "f",
                "source": {"description": "Hugging Face dataset CShorten/ML-ArXiv-Papers, split train",
                           "synthetic": False}, "stats": {"documents": 117592, "tokens": {"mean": 250.0}},
                "splits": {"train": {"tokens": 28_000_000, "documents": 111_700, "rows": 0, "shards": []},
                           "val": {"tokens": 1_400_000, "documents": 5_892, "rows": 0, "shards": []}}}
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    card = model_card(RunDir(run), cfg, 300, {})
    fm = _front_matter(card)
    assert fm["datasets"] == ["CShorten/ML-ArXiv-Papers"]
    assert "synthetic-data" not in fm["tags"] and "synthetic" not in card.lower().split("## training data")[1][:80]
    assert "Source: Hugging Face dataset CShorten/ML-ArXiv-Papers, split train" in card
    assert "Documents: 117,592" in card
    assert "Training split: 28,000,000 tokens from 111,700 documents" in card
    assert "Validation split: 1,400,000 tokens from 5,892 documents" in card
    assert "Tokens seen: unknown" in card


def test_model_card_without_eval(tmp_path):
    run, cfg = _run_dir(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    card = model_card(RunDir(run), cfg, 1, {"tokens_seen": 10})
    assert "Validation loss: not recorded" in card and "perplexity" not in card.lower()


def test_model_card_reads_a_real_manifest(tmp_path):
    from flax_gpt.data.prepare import prepare_shards

    run, cfg = _run_dir(tmp_path, synthetic_docs=40, seq_len=64)
    manifest = prepare_shards(cfg.data)
    card = model_card(RunDir(run), cfg, 300, {"tokens_seen": 5})
    assert manifest["source"]["description"] in card and "**The corpus is synthetic**" in card
    assert f"Training split: {manifest['splits']['train']['tokens']:,} tokens" in card
    assert "Documents: 40" in card


def test_model_card_takes_the_corpus_from_the_manifest_and_never_reads_it(tmp_path, monkeypatch):
    from flax_gpt.data import sources
    from flax_gpt.data.prepare import prepare_shards

    corpus = tmp_path / "abstracts.jsonl"
    corpus.write_text("".join(json.dumps({"abstract": f"paper {i} studies tokens"}) + "\n" for i in range(30)))
    run, cfg = _run_dir(tmp_path, source=str(corpus), seq_len=16)
    manifest = prepare_shards(cfg.data, log=None)

    def hashed(*_):
        raise AssertionError("the model card hashed the corpus")

    monkeypatch.setattr(sources, "_hash_file", hashed)  # how every local corpus is fingerprinted
    card = model_card(RunDir(run), cfg, 300, {})
    assert f"- Source: {manifest['source']['description']}" in card and "Documents: 30" in card
    (tmp_path / "shards" / "manifest.json").unlink()  # shards gone since training: the config names the corpus
    card = model_card(RunDir(run), cfg, 300, {})
    assert f"- Source: {corpus}\n" in card and "synthetic" not in card.lower().split("## training data")[1][:200]
