"""The one name map between our Flax GPT-2 and Hugging Face's GPT2LMHeadModel, and the import side:
an HF folder or Hub id -> our ModelConfig and parameters. Reads safetensors only (never pickle).

The export side (writing and checking an HF folder) is `flax_gpt.export.hf_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - names bfloat16 for numpy, so safetensors.numpy reads bf16 checkpoints
import numpy as np
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.numpy import load_file

from flax_gpt import hub, storage
from flax_gpt.config import ModelConfig
from flax_gpt.errors import HFError
from flax_gpt.hub import is_hub_id
from flax_gpt.presets import GPT2_EOS_ID, MODEL_PRESETS

# Ours -> HF, per block and at the top. LayerNorm "scale" is HF's "weight", a Conv1D "kernel" is
# HF's "weight" with the same (in, out) layout, so no transposes are needed anywhere.
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
# What an import reads from a Hub repo: weights as safetensors (never pickle), configs, tokenizer.
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]
# HF buffers that are not parameters (causal-mask constants in older checkpoints).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_UNSUPPORTED = {  # HF GPT2Config options this implementation does not reproduce
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "scale_attn_weights": True,
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a.b": x}: a params tree as dotted paths (every family's name map reads these)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"a.b": x} -> {"a": {"b": x}}: the inverse of `flatten`."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *mods, leaf = path.split(".")
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = value
    return tree


def to_hf_name(path: str) -> str:
    """'h_3.attn.c_attn.kernel' -> 'transformer.h.3.attn.c_attn.weight'."""
    *mods, leaf = path.split(".")
    if mods[0].startswith("h_"):
        mods = ["h", mods[0][2:], *mods[1:]]
    return "transformer." + ".".join([*mods, _LEAF[leaf]])


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our (unboxed) params -> HF state dict of numpy arrays; vocab padding is stripped."""
    out = {}
    for path, value in flatten(params).items():
        arr = np.asarray(value)
        if path == "wte.embedding":
            arr = arr[: cfg.vocab_size]
        out[to_hf_name(path)] = arr
    return out


def from_hf_state_dict(sd: dict[str, np.ndarray], cfg: ModelConfig, template: dict) -> dict:
    """HF state dict -> our params tree, shaped like `template` (a params tree or its shapes)."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}
    head = sd.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, sd.get("wte.weight")):
        raise HFError("the checkpoint's lm_head is not tied to wte; only tied GPT-2 heads are supported")
    flat_template = flatten(template)
    params_flat = {}
    for path, tmpl in flat_template.items():
        name = to_hf_name(path).removeprefix("transformer.")
        if name not in sd:
            raise HFError(f"weight '{name}' is missing from the checkpoint; is it a GPT-2 model of this shape?")
        arr = np.asarray(sd.pop(name), dtype=np.float32)
        want = tuple(tmpl.shape)
        if path == "wte.embedding" and arr.shape[0] < want[0]:
            # Padded vocab rows are zeros: never a real input id, and their logits are masked.
            arr = np.concatenate([arr, np.zeros((want[0] - arr.shape[0], arr.shape[1]), np.float32)])
        if arr.shape != want:
            raise HFError(f"weight '{name}' has shape {arr.shape} but the model expects {want}; "
                          "the checkpoint and model config disagree")
        params_flat[path] = arr
    if sd:
        raise HFError(f"unexpected weights in the checkpoint: {sorted(sd)[:5]}; is it a GPT-2 model?")
    return unflatten(params_flat)


def model_config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """An HF GPT2Config dict (config.json) -> our ModelConfig."""
    if hf.get("model_type") != "gpt2":
        raise HFError(f"config.json has model_type={hf.get('model_type')!r}, not 'gpt2'; "
                      "flax_gpt imports GPT-2-family models only")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"activation_function={hf['activation_function']!r} is not supported (GPT-2 uses gelu_new)")
    for key, want in _UNSUPPORTED.items():
        if hf.get(key, want) != want:
            raise HFError(f"config option {key}={hf[key]} is not supported by flax_gpt")
    arch = dict(n_layer=hf["n_layer"], n_embd=hf["n_embd"], n_head=hf["n_head"],
                vocab_size=hf["vocab_size"], n_positions=hf["n_positions"])
    preset = next((name for name, p in MODEL_PRESETS.items() if p == arch), "gpt2")
    fields = dict(
        preset=preset, **arch, n_inner=hf.get("n_inner") or 0,
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        embd_pdrop=hf.get("embd_pdrop", 0.1), attn_pdrop=hf.get("attn_pdrop", 0.1),
        resid_pdrop=hf.get("resid_pdrop", 0.1),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_dict(cfg: ModelConfig, eos_id: int = GPT2_EOS_ID) -> dict:
    """Our ModelConfig -> a GPT2Config dict for config.json."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
        "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions, "n_ctx": cfg.n_positions,
        "n_inner": cfg.n_inner or None, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon, "initializer_range": 0.02,
        "embd_pdrop": cfg.embd_pdrop, "attn_pdrop": cfg.attn_pdrop, "resid_pdrop": cfg.resid_pdrop,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def resolve_source(src: str) -> Path:
    """An HF model folder (local, or in a bucket: copied to a local cache) or a Hub id, decided as
    `transformers` decides: an existing local path wins, otherwise a valid repo id (`distilgpt2`,
    `openai-community/gpt2`) is fetched through the Hugging Face cache (`hub_snapshot`)."""
    if storage.is_remote(src):
        return storage.cached_copy(src, "models", what="model folder")
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise HFError(f"{src} is a file; pass a Hugging Face model folder (config.json + model.safetensors)")
        return p
    if not is_hub_id(src):
        raise HFError(f"model folder not found: {src}, and it is not a Hub id (`name` or `owner/name`); "
                      "check the path")
    return hub_snapshot(src.strip())


def hub_snapshot(repo_id: str) -> Path:
    """A Hub model's folder in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub).

    A complete cached copy is used as it is, without the network: a run starts the same way online
    and offline, and the hosts of a pod do not all query the Hub. Otherwise the files are downloaded
    into the cache, unless HF_HUB_OFFLINE=1 or the Hub does not answer within seconds (the quick
    check spares an offline user huggingface_hub's minute of retries)."""
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    cache = hub_constants.HF_HUB_CACHE
    if hub.hub_offline() or not hub.hub_reachable():
        why = "HF_HUB_OFFLINE is set" if hub.hub_offline() else "the Hugging Face Hub is unreachable"
        raise HFError(f"model {repo_id!r} is not a local folder, and as a Hub id it has no complete copy "
                      f"(config.json + safetensors) in the Hugging Face cache {cache} while {why}; download it "
                      "once online (or point HF_HUB_CACHE/HF_HOME at a cache that has it), or pass a local folder")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise HFError(f"the Hub refuses access to model {repo_id!r} (gated); accept its terms on huggingface.co "
                      "and log in with `hf auth login`, or pass a local model folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise HFError(f"model {repo_id!r} is not a local folder and the Hub has no such model; check the path "
                      "or id (a private model needs `hf auth login`)") from None
    except Exception as e:  # noqa: BLE001 - any other Hub failure is reported the same way
        raise HFError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                      "check the id and network, or pass a local model folder") from None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id`'s main revision when it holds config.json and all weights."""
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError) or an unreadable cache entry
        return None
    index = folder / "model.safetensors.index.json"
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else set()
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    complete = all((folder / f).is_file() for f in shards) if shards else (folder / "model.safetensors").is_file()
    return folder if complete and (folder / "config.json").is_file() else None


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json and all safetensors weights of an HF folder (single or sharded)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError:
        raise HFError(f"{cfg_path} is not valid JSON") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (only pickle weights found; convert them to safetensors first)" if any(folder.glob("*.bin")) else ""
        raise HFError(f"{folder} has no .safetensors weights{hint}")
    sd: dict[str, np.ndarray] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise HFError(f"cannot read {f.name}: {e}; the file is damaged or not safetensors") from None
    return hf_cfg, sd


def load_hf(src: str, template_fn, **model_overrides: Any) -> tuple[ModelConfig, dict]:
    """(ModelConfig, numpy params) from an HF folder or Hub id.

    `template_fn(cfg)` returns the params shapes for a config (e.g. an abstract init), so the vocab
    padding and dtype policy of our model apply to the imported weights.
    """
    folder = resolve_source(src)
    hf_cfg, sd = read_hf_folder(folder)
    cfg = model_config_from_hf(hf_cfg, **model_overrides)
    return cfg, from_hf_state_dict(sd, cfg, template_fn(cfg))
