"""Reading checkpoint files: .pth/.bin pickles (weights_only), safetensors, sharded index folders, hub repos."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import SafetensorError, safe_open

from internvit.errors import InternViTError
from internvit.weights.tags import PretrainedTag, resolve_tag

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REDOWNLOAD = "the file is corrupt or truncated: download or convert it again"


@dataclass
class RawCheckpoint:
    """Tensors as stored, with the files they came from and any safetensors metadata header."""

    tensors: dict[str, torch.Tensor] | object
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    tag: PretrainedTag | None = None

    @property
    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _load_pickle(path: Path) -> object:
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive, or (legacy) a pickle opening with the PROTO opcode 0x80 and protocol 2..5;
    # anything else is garbage, which weights_only would misreport as "refused to unpickle"
    if not is_zip and not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise InternViTError(
            f"{path}: cannot read this PyTorch file (neither a zip archive nor a pickle)", fix=_REDOWNLOAD
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise InternViTError(
            f"{path}: refused to unpickle objects other than tensors ({str(e).splitlines()[0]})",
            fix="re-save the checkpoint as a plain state dict, or convert it to safetensors with trusted code",
        ) from e
    except Exception as e:  # a damaged pickle stream fails in many ways (IndexError, KeyError, ...): all mean corrupt
        raise InternViTError(
            f"{path}: cannot read this PyTorch file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})",
            fix=_REDOWNLOAD,
        ) from e


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise InternViTError(f"{path}: cannot read this safetensors file ({e})", fix=_REDOWNLOAD) from e


def _load_file(path: Path) -> tuple[object, dict[str, str]]:
    with open(path, "rb") as f:
        magic = f.read(2)
    # a zip archive (torch.save) or a legacy pickle (PROTO opcode 0x80) is a pickle whatever its suffix
    looks_pickled = magic == b"PK" or magic[:1] == b"\x80"
    if path.suffix == ".safetensors" or (path.suffix not in PICKLE_SUFFIXES and not looks_pickled):
        return _load_safetensors(path)
    return _load_pickle(path), {}


def _load_index(index: Path) -> RawCheckpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InternViTError(f"{index}: not a valid shard index (needs a 'weight_map' object)", fix=_REDOWNLOAD) from e
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise InternViTError(
            f"{index.parent}: shard(s) listed in {index.name} are missing: {', '.join(missing)}",
            fix="download the whole repository (every shard next to the index)",
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        part, _ = _load_file(shard)
        if not isinstance(part, dict):
            raise InternViTError(f"{shard}: a shard must hold a flat state dict", fix=_REDOWNLOAD)
        tensors.update(part)
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise InternViTError(
            f"{index.parent}: {len(absent)} tensor(s) in the index are in no shard, e.g. {absent[0]}", fix=_REDOWNLOAD
        )
    return RawCheckpoint(tensors, [index, *shards])


def _find_in_dir(folder: Path) -> Path:
    for name in (*INDEX_NAMES, *SINGLE_NAMES):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "no checkpoint files"
    raise InternViTError(
        f"{folder}: cannot tell which checkpoint to load ({found})",
        fix="pass the file itself, or a folder with model.safetensors[.index.json] or pytorch_model.bin[.index.json]",
    )


def download(repo_id: str, filename: str | None = None) -> Path:
    """Fetch a hub repo (HF-format weights and configs) or one file of it; offline, a clear error with the fix."""
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename))
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # an older repo with only pytorch_model*.bin files
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.bin"]))
        return folder
    except Exception as e:  # hub errors vary by version and network state; all mean "not available here"
        what = f"{repo_id}/{filename}" if filename else repo_id
        get = f"{repo_id} {filename}" if filename else repo_id
        local = f"the local path DIR/{filename}" if filename else "the local path DIR"
        raise InternViTError(
            f"could not fetch {what} from the Hugging Face Hub ({type(e).__name__})",
            fix=f"download it where there is internet (`hf download {get} --local-dir DIR`) and pass {local}",
        ) from e


def looks_like_hub_id(source: str) -> bool:
    """`org/name`, but not a mistyped local path (`ckpts/model.pth`, or a first folder that exists here)."""
    if not HUB_ID.match(source) or source.startswith((".", "/")):
        return False
    return (
        Path(source).suffix not in (".safetensors", ".json", *PICKLE_SUFFIXES)
        and not Path(source.split("/")[0]).exists()
    )


def read_checkpoint(source: str | Path) -> RawCheckpoint:
    """Read a checkpoint from a file, a folder, a named tag (`internvit-6b-224px.hf`) or a hub id (`org/name`)."""
    path = Path(source).expanduser()
    tag = None
    if not path.exists():
        tag = resolve_tag(str(source))
        if tag is not None:
            path = download(tag.hub_id, tag.filename)
        elif looks_like_hub_id(str(source)):
            path = download(str(source))
        else:
            raise InternViTError(
                f"no such file or folder: {source}",
                fix="check the path, or pass a named tag (see `internvit models --tags`) or a hub id like org/name",
            )
    if path.is_dir():
        path = _find_in_dir(path)
    if path.name.endswith(".index.json"):
        raw = _load_index(path)
    else:
        tensors, metadata = _load_file(path)
        raw = RawCheckpoint(tensors, [path], metadata)
    raw.tag = tag
    return raw


def checkpoint_identity(source: str) -> dict[str, object]:
    """What identifies a backbone checkpoint cheaply, for a run's resume settings: our files' content hash (from
    the header), else path, size and modification time of each file; a tag, hub id or "random" by its name."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": str(source)}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if len(files) == 1 and files[0].suffix == ".safetensors":
        try:
            with safe_open(files[0], framework="pt") as f:
                digest = (f.metadata() or {}).get("content_sha256")
        except (SafetensorError, OSError):
            digest = None
        if digest:
            return {"content_sha256": digest}
    return {"files": [[str(p.resolve()), p.stat().st_size, int(p.stat().st_mtime)] for p in files]}
