"""Where a persona model's voices come from: a folder, or PersonaPlex's `voices.tgz` unpacked once.

PersonaPlex ships its voices as an archive next to the weights. It is
unpacked (regular files only, no links or paths outside the target) into a
cache folder named after the archive's content hash, so a changed archive is
unpacked again and an unchanged one is not.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from .persona import PRECOMPUTED_EXTENSION, VOICE_EXTENSIONS

CACHE_DIR = Path(os.environ.get("MOSHI_WEBRTC_CACHE", Path.home() / ".cache" / "moshi-webrtc"))


def voices_folder(path: Path, cache_dir: Path = CACHE_DIR) -> Path:
    """The folder holding the voices named by `path`: itself, or the archive's unpacked copy."""
    if path.is_dir():
        return path
    if not path.is_file() or not path.name.endswith((".tgz", ".tar.gz", ".tar")):
        raise FileNotFoundError(f"voices {path}: not a folder, nor a .tgz/.tar archive")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    target = cache_dir / "voices" / digest
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as archive:
            members = [m for m in archive.getmembers() if m.isfile()]
            archive.extractall(target, members=members, filter="data")
        (target / ".complete").touch()
    return _folder_with_voices(target)


def _folder_with_voices(root: Path) -> Path:
    """Archives often hold one top folder: return the shallowest folder that has voice files."""
    suffixes = (*VOICE_EXTENSIONS, PRECOMPUTED_EXTENSION)
    for folder in sorted({root, *(p.parent for p in root.rglob("*") if p.suffix.lower() in suffixes)},
                         key=lambda p: len(p.parts)):
        if any(p.suffix.lower() in suffixes for p in folder.iterdir() if p.is_file()):
            return folder
    raise FileNotFoundError(f"the voices archive unpacked to {root} holds no voice files")
