"""The notebook API (`flax_gpt.api`) end to end on one tiny run, trained in this process: config ->
prepare -> train with live metrics -> evaluate -> generate -> export -> push -> plots, each compared
with what the CLI, the files on disk or `transformers` say."""

from __future__ import annotations

import json
import shutil
import signal
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import ROOT, TRAINED_OVERRIDES
from matplotlib.figure import Figure
from matplotlib.image import imread
from test_publish import SECRET, hub_server  # noqa: F401 - the stand-in Hub (a fixture) and its token

from flax_gpt import api, cli
from flax_gpt.config_files import config_yaml
from flax_gpt.data.shards import read_manifest
from flax_gpt.errors import ConfigError, DataError
from flax_gpt.report.plots import save
from flax_gpt.report.report import write_report
from flax_gpt.storage import MARKER
from flax_gpt.train.run_dir import RunDir

CONFIG = ROOT / "configs" / "tiny.yaml"
STEPS = ("train.steps=4", "train.eval_every=2", "checkpoint.every=2")  # conftest's trained_run, via the CLI
PROMPTS = ["clustering", "the role of recommender systems"]
COMPUTED = ("step", "loss", "lr", "grad_norm", "tokens_seen", "val_loss", "perplexity", "tokens")  # not timings


def computed(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in COMPUTED if k in r} for r in records]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    overrides = (*TRAINED_OVERRIDES, *STEPS, f"data.shards_dir={root / 'shards'}", f"train.run_dir={root / 'run'}")
    cfg = api.config(CONFIG, *overrides)
    manifest = api.prepare(cfg)
    records: list[dict] = []
    lm = api.train(cfg, on_metrics=records.append)
    return SimpleNamespace(root=root, overrides=overrides, cfg=cfg, manifest=manifest, records=records, lm=lm)


@pytest.fixture(scope="module")
def exported(flow):
    """A second model of the same run, exported (push_to_hub uploads its export)."""
    lm = api.LM.from_run(flow.cfg.train.run_dir)
    lm.export(flow.root / "export")
    return lm


def test_config_is_the_one_the_cli_resolves(flow, capsys):
    assert cli.main(["config", str(CONFIG), *flow.overrides]) == 0
    assert capsys.readouterr().out == config_yaml(flow.cfg)
    assert RunDir(flow.cfg.train.run_dir).config() == flow.cfg  # the run saved the API's config
    # A Config object takes overrides as a YAML path does.
    assert api.config(api.config(CONFIG), *flow.overrides) == flow.cfg
    assert api.config(flow.cfg, "train.steps=9").train.steps == 9 != flow.cfg.train.steps
    with pytest.raises(ConfigError, match="train.steps"):
        api.config(flow.cfg, "train.stepz=9")


def test_prepare_returns_the_manifest_and_refuses_other_inputs(flow):
    assert flow.manifest == read_manifest(flow.cfg.data.shards_dir)
    assert flow.manifest["stats"]["documents"] == flow.cfg.data.synthetic_docs
    with pytest.raises(DataError, match="--overwrite"):
        api.prepare(flow.cfg, "data.synthetic_docs=121")
    assert read_manifest(flow.cfg.data.shards_dir) == flow.manifest  # nothing was touched


def test_train_streams_each_metrics_record_as_written(flow):
    assert flow.records == RunDir(flow.cfg.train.run_dir).metrics()
    assert [r["step"] for r in flow.records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in flow.records if "val_loss" in r] == [2, 4]
    assert flow.lm.result["step"] == flow.lm.step == 4
    assert flow.lm.result["val_loss"] == flow.records[-1]["val_loss"]


def test_api_run_is_the_cli_run(flow, trained_run):
    """The same config through `api.train` and `flax-gpt train` computes the same run."""
    assert computed(flow.records) == computed(RunDir(trained_run / "run").metrics())


def test_interrupting_train_checkpoints_and_the_same_call_resumes(flow, tmp_path):
    """A notebook's interrupt (SIGINT) during `api.train` finishes the step, writes a checkpoint and
    returns; the same call then continues to the run that never stopped."""
    cfg = api.config(flow.cfg, f"train.run_dir={tmp_path / 'run'}")
    seen: list[dict] = []

    def interrupt_once(record):
        seen.append(record)
        if len(seen) == 1:  # step 1 is written while step 2 runs: the loop stops after step 2
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler  # else pytest would stop
            signal.raise_signal(signal.SIGINT)

    first = api.train(cfg, on_metrics=interrupt_once)
    assert first.result == {"step": 2, "preempted": True} and first.step == 2
    second = api.train(cfg, on_metrics=seen.append)
    assert second.step == 4
    assert computed(seen) == computed(flow.records)


def test_the_end_of_training_exports_and_samples_the_parameters_in_memory(flow, tmp_path, monkeypatch, capsys):
    """train's export, samples and returned model use the trained parameters where they are, in
    memory: with every checkpoint reader broken they still come out, and they are what the last
    checkpoint holds (the export byte for byte `export` of it, the samples the same text)."""
    cfg = api.config(flow.cfg, f"train.run_dir={tmp_path / 'run'}", f"train.export_dir={tmp_path / 'exp'}",
                     "train.sample_prompts=[clustering]")

    def unread(*a, **k):
        raise AssertionError("a checkpoint was read back")

    with monkeypatch.context() as m:
        m.setattr(RunDir, "load_params", unread)
        capsys.readouterr()
        lm = api.train(cfg)
        printed = capsys.readouterr().out
    assert lm.step == 4 and lm.result["export_dir"] == str(tmp_path / "exp")
    from_disk = api.LM.from_run(tmp_path / "run")
    assert from_disk.step == 4
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(from_disk.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from_disk.export(tmp_path / "exp2")
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("exp", "exp2")]
    assert weights[0] == weights[1]
    sample = from_disk.generate("clustering", max_new_tokens=cfg.train.sample_max_new_tokens, seed=cfg.train.seed,
                                top_p=0.95)[0]
    assert f"--- sample: 'clustering'\n{sample}\n" in printed


def test_evaluate_is_the_training_eval_and_the_cli_eval(flow, capsys):
    got = flow.lm.evaluate()
    last = flow.records[-1]
    assert (got["step"], got["val_loss"], got["tokens"]) == (4, last["val_loss"], last["tokens"])
    corpus = flow.root / "abstracts.jsonl"
    docs = ["clustering of graphs with spectral methods and their limits " * 3,
            "we study transformers for text generation on small corpora " * 4]
    corpus.write_text("".join(json.dumps({"abstract": d}) + "\n" for d in docs))
    ours = flow.lm.evaluate(corpus, seq_len=16)
    capsys.readouterr()
    assert cli.main(["eval", str(flow.cfg.train.run_dir), "--data", str(corpus), "--seq-len", "16"]) == 0
    assert json.loads(capsys.readouterr().out) == ours
    assert ours["val_loss"] != got["val_loss"]


def test_generate_is_the_same_from_the_run_its_export_and_their_imports(flow, exported, tmp_path):
    greedy = flow.lm.generate(PROMPTS, max_new_tokens=8, greedy=True)
    assert len(greedy) == 2 and all(t.startswith(p) and t != p for t, p in zip(greedy, PROMPTS))
    assert exported.generate(PROMPTS, max_new_tokens=8, greedy=True) == greedy
    from_hf = api.LM.from_hf(exported.folder)
    assert from_hf.generate(PROMPTS, max_new_tokens=8, greedy=True) == greedy
    imported = api.import_hf(str(exported.folder), tmp_path / "imported")
    assert imported.step == 0 and imported.generate(PROMPTS, max_new_tokens=8, greedy=True) == greedy
    sampled = flow.lm.generate(PROMPTS[0], max_new_tokens=8, num_samples=2, top_p=0.9, seed=1)
    assert sampled == from_hf.generate(PROMPTS[0], max_new_tokens=8, num_samples=2, top_p=0.9, seed=1)


def test_export_loads_in_transformers_and_pushes_to_the_hub(flow, exported, hub_server):  # noqa: F811 - pytest fixture
    transformers = pytest.importorskip("transformers")

    model = transformers.AutoModelForCausalLM.from_pretrained(exported.folder)
    shape = (model.config.n_layer, model.config.n_embd, model.config.vocab_size)
    assert shape == (flow.cfg.model.n_layer, flow.cfg.model.n_embd, flow.cfg.model.vocab_size)
    hub, endpoint = hub_server
    url = exported.push_to_hub("alice/tiny-gpt", token=SECRET, endpoint=endpoint)
    assert url == f"{endpoint}/alice/tiny-gpt"
    local = {p.name: p.read_bytes() for p in exported.folder.iterdir() if p.name != MARKER}
    assert hub.repos["alice/tiny-gpt"]["branches"]["main"] == local and hub.unexpected == []


def test_plots_are_the_reports_figures(flow, tmp_path):
    figures = flow.lm.plots()
    assert set(figures) == {"loss", "perplexity", "learning_rate", "throughput", "corpus_lengths"}
    run = tmp_path / "run"  # the report writes into its run directory: a copy's
    shutil.copytree(flow.cfg.train.run_dir, run)
    write_report(run, samples=0, say=lambda _line: None)
    for name, fig in figures.items():
        assert isinstance(fig, Figure) and fig.axes and fig.axes[0].get_xlabel(), name
        ours = save(fig, tmp_path / f"{name}.png")  # drawn as the report draws its files
        assert np.array_equal(imread(tmp_path / ours), imread(run / "report" / f"{name}.png")), name


def test_errors_are_the_clis_one_line_errors(flow, exported):
    with pytest.raises(ConfigError, match="export"):
        api.LM.from_run(flow.cfg.train.run_dir).push_to_hub("alice/tiny-gpt")  # nothing exported yet
    hf = api.LM.from_hf(exported.folder)
    with pytest.raises(ConfigError, match="LM.from_run"):
        hf.plots()
    with pytest.raises(ConfigError, match="--data"):
        hf.evaluate()
    with pytest.raises(ConfigError, match="model.n_embd"):  # the run refuses a different model, before training
        api.train(flow.cfg, "model.n_embd=64")
