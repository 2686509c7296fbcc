"""A bundle's files: confined paths, nothing unlisted, and integrity checks that are cheap by default.

A bundle is self-contained. Every path the manifest names is relative, uses forward slashes, has no `.` or
`..` part, and resolves (symlinks followed) to a regular file inside the bundle directory. Every file in the
bundle is listed in the manifest's `files` with its sha256 (the manifest itself excepted), so nothing the
runtime or ONNX Runtime reads (a graph's external weights included: ONNX Runtime refuses external data
outside the graph's directory) escapes the hash list. These checks run before any listed file is opened.

Integrity levels:
    sizes   (default at load) every listed file exists with the size the export recorded; a file without a
            recorded size (bundles written before sizes were) is hashed. Costs a stat per file.
    full    every file is re-hashed against its sha256 (`specreason info --verify`): 2-3 s per GB.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from .errors import BundleError

Integrity = Literal["sizes", "full"]
INTEGRITY_LEVELS: tuple[Integrity, ...] = ("sizes", "full")
MANIFEST_NAME = "manifest.json"
# `specreason-export --engines-only` writes the new manifest beside the old one, then renames it.
_MANIFEST_TEMP_PREFIX = f".{MANIFEST_NAME}.tmp-"
_REEXPORT = "re-export the bundle with specreason-export"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def confined(bundle: Path, rel: str, *, what: str) -> Path:
    """The resolved path of `rel` inside `bundle`; BundleError if it is not a plain relative path or if it
    (through a symlink) leads outside the bundle."""
    parts = rel.split("/")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or "\\" in rel or "\0" in rel
            or any(part in ("", ".", "..") for part in parts)):
        raise BundleError(f"{what} {rel!r} is not a relative path inside the bundle (absolute paths, '.', '..', "
                          f"empty parts and backslashes are refused); {_REEXPORT}")
    root = bundle.resolve()
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise BundleError(f"{what} {rel!r} leads outside the bundle (to {resolved}) through a symlink; a bundle "
                          f"must be self-contained: replace the link by the file or {_REEXPORT}")
    return resolved


def _unlisted(bundle: Path, files: Mapping[str, str]) -> list[str]:
    """Files in the bundle that the manifest does not list; BundleError for a symlink leading outside."""
    root = bundle.resolve()
    found = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise BundleError(f"{rel} in {bundle} is a symlink leading outside the bundle (to "
                                  f"{path.resolve()}); replace it by the file or {_REEXPORT}")
            if name in names and rel != MANIFEST_NAME and not rel.startswith(_MANIFEST_TEMP_PREFIX) \
                    and rel not in files:
                found.append(rel)
    return sorted(found)


def check_files(bundle: Path, *, files: Mapping[str, str], sizes: Mapping[str, int], integrity: Integrity) -> None:
    """Check the listed files (see the module docstring); BundleError naming the first problem."""
    if integrity not in INTEGRITY_LEVELS:
        raise ValueError(f"integrity must be one of {INTEGRITY_LEVELS}, not {integrity!r}")
    resolved = {rel: confined(bundle, rel, what="file") for rel in files}
    for rel, path in resolved.items():
        if not path.is_file():
            raise BundleError(f"bundle file {rel} listed in the manifest is missing from {bundle}; {_REEXPORT}")
    extra = _unlisted(bundle, files)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise BundleError(f"{bundle} holds files its manifest does not list ({shown}): unlisted files are never "
                          f"loaded unhashed, so remove them or {_REEXPORT}")
    for rel, path in resolved.items():
        if rel in sizes and path.stat().st_size != sizes[rel]:
            raise BundleError(f"bundle file {rel} has {path.stat().st_size} bytes, the manifest records "
                              f"{sizes[rel]}: it was changed or truncated after export; {_REEXPORT}")
        if (integrity == "full" or rel not in sizes) and sha256_file(path) != files[rel]:
            raise BundleError(f"bundle file {rel} does not match its hash in the manifest: it was changed "
                              f"or corrupted after export; {_REEXPORT}")
