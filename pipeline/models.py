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
