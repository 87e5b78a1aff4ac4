"""Where a model comes from, checked before anything loads it: a local folder of safetensors, or a Hub id.

dice loads weights from safetensors only (transformers `use_safetensors=True`, vLLM `load_format="safetensors"`),
because the other formats (`pytorch_model.bin`, `.pt`, `.pth`, `.ckpt`) are pickles that run code when loaded.
`check_model` refuses such a folder up front, naming it and saying how to convert it, instead of letting one
engine refuse it half-way through a round (or another accept it).

Local or Hub: a name is a local path when it is absolute, starts with `.` or `~`, has more than one `/`, or
its first part is a folder that exists here (`models/tiny`); otherwise (`org/name`, `gpt2`) it is a Hub id.
A local path that does not exist is an error at once, never a Hub lookup with network retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HUB_PREFIX = "hf://datasets/"  # how a plan names a Hub dataset input: hf://datasets/<id>@<revision>
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def looks_local(name: str) -> bool:
    """True when `name` names a local folder rather than a Hub repository (module docstring)."""
    if name.startswith((".", "~", "/")) or Path(name).is_absolute() or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return "/" in name and Path(first).is_dir() or Path(name).exists()


def convert_hint(folder: str) -> str:
    return (
        "convert it once, only if you trust its source (loading a pickle runs its code): python -c \"from "
        f"transformers import AutoModelForCausalLM as M, AutoTokenizer as T; p = '{folder}'; "
        f"M.from_pretrained(p).save_pretrained(p + '-safetensors', safe_serialization=True); "
        "T.from_pretrained(p).save_pretrained(p + '-safetensors')\" and point dice at the new folder"
    )


def check_model(name: str, what: str = "model") -> None:
    """Refuse, with a message naming `what` and the folder, a model dice must not or cannot load.

    Local folders must exist, hold a config.json and safetensors weights. Hub ids pass (the engines load them
    with safetensors only, and say so if the repository has none).

    Raises:
        ValueError: the folder is missing, holds no config.json, or holds only pickle weights.
    """
    name = str(name)
    if not looks_local(name):
        return
    p = Path(name).expanduser()
    if not p.exists():
        raise ValueError(f"{what} {name}: the folder does not exist (did the round that writes it finish?)")
    if not p.is_dir():
        raise ValueError(f"{what} {name}: a file, not a model folder")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what} {name}: no config.json in the folder; is it a Hugging Face model folder?")
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for pattern in PICKLE_WEIGHTS for f in p.glob(pattern))
    if pickles:
        raise ValueError(
            f"{what} {name}: its weights are pickle files ({', '.join(pickles[:3])}); dice loads safetensors "
            f"only. {convert_hint(name)}"
        )
    raise ValueError(f"{what} {name}: no *.safetensors weights in the folder")


# ---------------------------------------------------------------------------------------------- the Hub
#
# A Hub model is named `org/name`, or `org/name@revision` when the config gives a revision (model.revision,
# model.reference_revision, a judge's revision, label.reward_model_revision): that one string travels through the
# plans, so a stage reads the same repository at the same revision as the flow fingerprinted. `local_model`
# turns it into the local snapshot folder huggingface_hub keeps (downloading it once, safetensors and tokenizer
# files only), which every loader then reads like any local folder; offline (HF_HUB_OFFLINE=1) the cache serves
# it. Its fingerprint is the snapshot's commit, so a branch that moved is a different input.

PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.h5", "*.msgpack", "*.onnx*", "original/*"]


def with_revision(name: str, revision: str | None) -> str:
    """`org/name@revision` for a Hub id with a revision; anything else unchanged."""
    return f"{name}@{revision}" if revision and not looks_local(name) else name


def split_revision(name: str) -> tuple[str, str | None]:
    """(`org/name`, revision or None) of a Hub name; a local path is never split."""
    if looks_local(name) or "@" not in name:
        return name, None
    repo, _, rev = name.rpartition("@")
    return repo, rev or None


def _snapshot(repo: str, revision: str | None, repo_type: str, what: str, ignore: list[str] | None = None,
              allow: list[str] | None = None, local_only: bool = False) -> Path:  # fmt: skip
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision, ignore_patterns=ignore,
                                      allow_patterns=allow, local_files_only=local_only))  # fmt: skip
    except LocalEntryNotFoundError as e:
        raise ValueError(
            f"{what} {repo}{'@' + revision if revision else ''}: not in the local Hugging Face cache and the Hub "
            f"cannot be reached ({type(e).__name__}); download it once with network, or point at a local folder"
        ) from None
    except (RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ValueError(f"{what} {repo}: could not be fetched from the Hub ({type(e).__name__}: {e})") from None


# Memory of what this process resolved, so that every read of one name gets the commit its fingerprint recorded
# (a branch that moves mid-stage must not make a stage read other data than its manifest names): model name ->
# snapshot folder, "tokenizer:<name>" -> folder, "dataset:<id>@<revision>" -> (commit, file names or None).
_resolved: dict[str, Any] = {}

# What AutoTokenizer reads from a model repository: `dice data check` measures prompts without the weights.
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                      "chat_template*", "config.json", "generation_config.json"]  # fmt: skip


def local_model(name: str, what: str = "model") -> str:
    """The local folder of a model: `name` itself when local, else its Hub snapshot (module notes above); checked
    with `check_model` (a missing folder or pickle weights is refused)."""
    name = str(name)
    if looks_local(name):
        check_model(name, what)
        return name
    if name not in _resolved:
        repo, rev = split_revision(name)
        folder = _snapshot(repo, rev, "model", what, PICKLE_PATTERNS)
        check_model(str(folder), f"{what} {name} (Hub snapshot)")
        _resolved[name] = str(folder)
    return _resolved[name]


def local_tokenizer(name: str, what: str = "model") -> str:
    """The local folder holding a model's tokenizer: the model folder itself when local (it must exist), else its Hub
    snapshot at the revision in `name` with the tokenizer and config files alone, never the weights."""
    name = str(name)
    if looks_local(name):
        if not Path(name).expanduser().is_dir():
            raise ValueError(f"{what} {name}: the folder does not exist")
        return name
    if name in _resolved:  # the whole model is here already
        return _resolved[name]
    key = f"tokenizer:{name}"
    if key not in _resolved:
        repo, rev = split_revision(name)
        _resolved[key] = str(_snapshot(repo, rev, "model", what, allow=TOKENIZER_PATTERNS))
    return _resolved[key]


def _hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def dataset_info(repo: str, revision: str | None, what: str = "dataset") -> tuple[str, list[str] | None]:
    """(commit, the repository's file names) of a Hub dataset at `revision` (empty: main), asked of the Hub once per
    process; offline (HF_HUB_OFFLINE=1) or with the Hub unreachable, the local cache answers (file names None: what
    the cache holds is what there is). Every later call for the same (repo, revision) gets the same commit: the one
    the stage's manifest records is the one it reads."""
    key = f"dataset:{repo}@{revision or ''}"
    if key in _resolved:
        return _resolved[key]
    info = None
    if not _hub_offline():
        import httpx
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            info = HfApi().dataset_info(repo, revision=revision)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise ValueError(f"{what} {repo}{'@' + revision if revision else ''}: {type(e).__name__} on the Hub "
                             f"({str(e).splitlines()[0]})") from None  # fmt: skip
        except (HfHubHTTPError, OSError, httpx.HTTPError):
            info = None  # unreachable: the local cache may hold it
    if info is not None and info.sha:
        found: tuple[str, list[str] | None] = (info.sha, [s.rfilename for s in info.siblings or []])
    else:
        folder = _snapshot(repo, revision, "dataset", what, local_only=True)
        found = (hub_commit(folder) or str(folder.name), None)
    _resolved[key] = found
    return found


def dataset_commit(repo: str, revision: str | None, what: str = "dataset") -> str:
    """The commit a Hub dataset's `revision` resolves to (`dataset_info`): its fingerprint in the manifests."""
    return dataset_info(repo, revision, what)[0]


def dataset_snapshot(repo: str, commit: str, files: list[str] | None, what: str = "dataset") -> Path:
    """The local snapshot folder of a Hub dataset at `commit`, holding at least `files` (downloaded once; None: the
    whole repository, or offline what the cache holds)."""
    import glob

    allow = None if files is None else [glob.escape(f) for f in files]
    return _snapshot(repo, commit, "dataset", what, allow=allow, local_only=_hub_offline())


def hub_commit(folder: str | Path) -> str | None:
    """The commit of a huggingface_hub snapshot folder (…/snapshots/<commit>), or None for any other folder."""
    p = Path(folder)
    return p.name if p.parent.name == "snapshots" and len(p.name) == 40 else None
