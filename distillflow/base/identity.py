"""A model's identity, without loading it: the files of a local folder that can change
its outputs, or a hub id at a revision. Light (no torch, no transformers), so the
identify stage that runs on every `dvc repro` starts fast."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from distillflow.base.errors import ModelError
from distillflow.base.io import digest_path


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: `toy`, a local folder, or a hub id at a revision."""

    name: str
    revision: str | None


def weights_kind(folder: Path) -> str:
    """ "safetensors" when the folder has safetensors weights; refuses folders with only
    pickle weights (`pytorch_model.bin`: loading them runs arbitrary code) or none."""
    if any(folder.glob("*.safetensors")):
        return "safetensors"
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelError(
            f"model folder {folder}: only pickle weights ({', '.join(pickles)}); distillflow loads only safetensors "
            "(convert once: load the model and save_pretrained(..., safe_serialization=True))"
        )
    raise ModelError(f"model folder {folder}: no .safetensors weights; distillflow loads only safetensors")


# Files of a model folder that cannot change a model's outputs: left out of its identity.
NOT_IDENTITY = (".md",)


def identity_files(folder: Path) -> list[Path]:
    """Every file of a model folder that can change its outputs: weights, config,
    generation_config (eos ids, sampling defaults), tokenizer files and chat template.
    Hidden files and folders (download caches) and READMEs are left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix not in NOT_IDENTITY
    )


def fingerprint(where: str, revision: str | None) -> str:
    """A stable identity for a model, used in generation ids and lineage.

    A local folder (the toy models included) is fingerprinted by the digest of every
    file that can change the model's outputs (identity_files: weights, config,
    generation_config, tokenizer, chat template); a hub model by id and revision (the
    files are not local; pin the revision to a commit for an exact identity).
    """
    path = Path(where)
    if path.is_dir():
        weights_kind(path)
        h = hashlib.sha256()
        for p in identity_files(path):
            h.update(p.relative_to(path).as_posix().encode())
            h.update(digest_path(p).encode())
        return f"sha256:{h.hexdigest()[:32]}"
    if where.startswith(("/", ".", "~")) or where.count("/") != 1:  # a hub id is `owner/name`
        raise ModelError(f"model {where!r}: no such model folder (and not a hub id, which is `owner/name`)")
    if revision is None:
        raise ModelError(
            f"model {where!r} is not a local folder, so it needs a pinned `revision` (a commit hash or tag)"
        )
    return f"hub:{where}@{revision}"
