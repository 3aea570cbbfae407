"""Hub repos: only the shards holding the vision backbone are fetched (not an InternVL chat repo's LLM), and read."""

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import assert_same, expect_error, native_sd, prefixed, save_pth, save_st, unrelated

from internvit.weights import files, from_native, load_model
from internvit.weights.files import backbone_shards
from internvit.weights.keymaps import VISION_PREFIXES

REPO_ID = "OpenGVLab/InternVL-tiny-chat"


def _index(weight_map: dict[str, str]) -> dict:
    return {"metadata": {"total_size": 0}, "weight_map": weight_map}


def _shard(j: int, n: int = 4) -> str:
    return f"model-{j:05d}-of-{n:05d}.safetensors"


# ----------------------------------------------------------------------------------------------- backbone_shards


def test_only_the_shards_of_the_vision_tower_are_chosen():
    weight_map = {
        "vision_model.embeddings.class_embedding": _shard(1),
        "vision_model.encoder.layers.0.attn.qkv.weight": _shard(1),
        "vision_model.encoder.layers.1.attn.qkv.weight": _shard(2),
        "language_model.model.layers.0.mlp.w1.weight": _shard(2),
        "language_model.model.layers.1.mlp.w1.weight": _shard(3),
        "language_model.output.weight": _shard(4),
        "mlp1.0.weight": _shard(4),
    }
    assert backbone_shards(_index(weight_map)) == [_shard(1), _shard(2)]
    assert backbone_shards(_index(weight_map), VISION_PREFIXES) == [_shard(1), _shard(2)]


def test_transformers_hf_prefix_and_a_clip_projector_beside_the_tower():
    weight_map = {
        "model.language_model.embed_tokens.weight": _shard(1),
        "model.vision_tower.embeddings.cls_token": _shard(2),
        "model.multi_modal_projector.linear_1.weight": _shard(3),
        "lm_head.weight": _shard(4),
    }
    assert backbone_shards(_index(weight_map)) == [_shard(2)]
    weight_map = {"vision_model.embeddings.class_embedding": _shard(1), "clip_projector.cross_attn.q.weight": _shard(3)}
    assert backbone_shards(_index(weight_map)) == [_shard(1), _shard(3)]  # kept with the tower, as to_native does


def test_a_bare_backbone_index_needs_every_shard():
    weight_map = {"embeddings.class_embedding": _shard(2), "encoder.layers.0.ls1": _shard(1), "x.weight": _shard(3)}
    assert backbone_shards(_index(weight_map)) == [_shard(1), _shard(2), _shard(3)]


def test_an_index_without_a_vision_backbone_fails_clearly():
    weight_map = {"language_model.model.layers.0.mlp.w1.weight": _shard(1), "mlp1.0.weight": _shard(2)}
    err = expect_error("no tensor of a vision backbone", backbone_shards, _index(weight_map), where="org/llm")
    assert err.message.startswith("org/llm: ") and "vision_model." in err.message
    assert "first keys: language_model.model.layers.0.mlp.w1.weight, mlp1.0.weight" in err.message
    for bad in ({}, {"weight_map": {}}, {"weight_map": ["a.safetensors"]}, [1, 2]):
        expect_error("not a valid shard index", backbone_shards, bad)
    expect_error(r"weight_map entry 'a' is null, not a shard file name", backbone_shards, {"weight_map": {"a": None}})


# ----------------------------------------------------------------------------------------------- a chat repo


def _chat_repo(folder: Path, fmt: str) -> tuple[dict[str, torch.Tensor], str, dict[str, torch.Tensor]]:
    """An InternVL chat repo: config, index and 3 shards; the tiny vision tower (with the MLP projector) in the
    middle one, fake LLM tensors in the others. -> (backbone in our layout, the vision shard, projector tensors)."""
    sd = native_sd()
    projector = unrelated(("mlp1.0.",))
    suffix, save = {"safetensors": (".safetensors", save_st), "bin": (".bin", save_pth)}[fmt]
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    parts = [
        unrelated(("language_model.model.tok_embeddings.", "language_model.model.layers.0.attention.wqkv.")),
        prefixed(from_native(sd, "hf_internvit"), "vision_model.") | projector,
        unrelated(("language_model.model.layers.1.feed_forward.w1.", "language_model.output.")),
    ]
    weight_map = {}
    for j, part in enumerate(parts):
        name = f"{stem}-{j + 1:05d}-of-00003{suffix}"
        save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
    (folder / f"{stem}{suffix}.index.json").write_text(json.dumps(_index(weight_map)))
    (folder / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    return sd, f"{stem}-00002-of-00003{suffix}", projector


class FakeHub:
    """`snapshot_download` over a local folder laid out like a hub repo, with a hub cache in front of it: offline
    (local_files_only) it serves the cache if every file the patterns match is there; online it copies them."""

    def __init__(self, repo: Path, cache: Path) -> None:
        self.repo, self.cache = repo, cache
        self.patterns: list[list[str]] = []
        self.fetched: list[str] = []

    def __call__(self, repo_id: str, *, allow_patterns: list[str], local_files_only: bool = False, **kwargs) -> str:
        assert repo_id == REPO_ID and not kwargs
        names = sorted(
            p.name for p in self.repo.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in allow_patterns)
        )
        if local_files_only:
            if not self.cache.is_dir() or not all((self.cache / n).is_file() for n in names):
                raise FileNotFoundError("the cached snapshot is incomplete")
            return str(self.cache)
        self.patterns.append(list(allow_patterns))
        self.cache.mkdir(exist_ok=True)
        for name in names:
            if not (self.cache / name).exists():
                shutil.copy(self.repo / name, self.cache / name)
                self.fetched.append(name)
        return str(self.cache)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub for REPO_ID in place of the real one, reachable; run from tmp_path (no local folder of that name)."""
    repo = tmp_path / "remote"
    repo.mkdir()
    fake = FakeHub(repo, tmp_path / "cache")
    monkeypatch.setattr(files, "snapshot_download", fake)
    monkeypatch.setattr(files, "hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    return fake


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_chat_repo_fetches_and_loads_only_its_vision_shard(hub, monkeypatch, fmt):
    sd, vision_shard, projector = _chat_repo(hub.repo, fmt)
    model, report = load_model(REPO_ID)
    assert report.ok and report.layout == "hf_internvit" and report.preset == "debug"
    assert_same(model.state_dict(), sd)
    assert set(report.set_aside) == set(projector)  # beside the tower in its shard; the LLM shards were never read
    index = f"{'model.safetensors' if fmt == 'safetensors' else 'pytorch_model.bin'}.index.json"
    assert sorted(hub.fetched) == sorted(["config.json", index, vision_shard])
    probe = [["*.json", "*.safetensors"]] if fmt == "bin" else []  # a .bin repo: no safetensors (matches nothing)
    assert hub.patterns == [["*.json"], *probe, ["*.json", vision_shard]]
    # again: all from the cache, no network
    monkeypatch.setattr(files, "hub_reachable", lambda timeout_s=3.0: pytest.fail("the cache needs no network"))
    hub.patterns.clear()
    assert_same(load_model(REPO_ID)[0].state_dict(), sd)
    assert hub.patterns == []


def test_single_file_repo_without_an_index_is_fetched_whole(hub):
    sd = native_sd()
    save_st(from_native(sd, "hf_internvit"), hub.repo / "model.safetensors")
    (hub.repo / "config.json").write_text("{}")
    assert_same(load_model(REPO_ID)[0].state_dict(), sd)
    assert sorted(hub.fetched) == ["config.json", "model.safetensors"]
    assert hub.patterns == [["*.json"], ["*.json", "*.safetensors"]]


def test_chat_repo_without_a_vision_tower_fails_before_fetching_weights(hub):
    save_st(unrelated(("language_model.output.",)), hub.repo / "model-00001-of-00001.safetensors")
    index = _index({"language_model.output.weight": "model-00001-of-00001.safetensors"})
    (hub.repo / "model.safetensors.index.json").write_text(json.dumps(index))
    err = expect_error("no tensor of a vision backbone", load_model, REPO_ID)
    assert err.message.startswith(f"{REPO_ID}: model.safetensors.index.json: ")
    assert hub.fetched == ["model.safetensors.index.json"]


# ----------------------------------------------------------------------------------------------- reading the index


def test_local_chat_folder_with_only_its_vision_shard_loads(tmp_path):
    sd, vision_shard, _ = _chat_repo(tmp_path, "safetensors")
    for name in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (tmp_path / name).unlink()
    model, report = load_model(tmp_path)
    assert report.ok and report.num_loaded == len(sd)
    assert_same(model.state_dict(), sd)


def test_a_missing_shard_with_vision_tensors_is_an_error(tmp_path):
    _, vision_shard, _ = _chat_repo(tmp_path, "safetensors")
    for name in (vision_shard, "model-00001-of-00003.safetensors"):
        (tmp_path / name).unlink()
    err = expect_error("missing", load_model, tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    assert err.message == f"{index}: 1 shard file(s) it lists are missing: {vision_shard}"  # not the LLM's shard
    assert err.fix.startswith("they hold backbone tensors (e.g. vision_model.")
