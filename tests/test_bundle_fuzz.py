"""Issue 11 acceptance: a fuzz of bundle manifests over the schema. Every mutated manifest either loads or is
one BundleError (never another exception), and nothing outside the bundle directory is opened or listed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specreason_rt.errors import BundleError
from specreason_rt.manifest import load_manifest

# Paths an attacker would write; "../outside.json" exists next to the bundle, so reading it would succeed.
HOSTILE_PATHS = ["../outside.json", "/etc/hostname", "speculator/../../outside.json", "./manifest.json",
                 "speculator//tokenizer.json", "C:\\x", "verifier/model.onnx", "speculator/tokenizer.json",
                 "manifest.json", "", "\0", "a" * 2000]
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=20) | st.sampled_from(HOSTILE_PATHS))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(HOSTILE_PATHS), inner, max_size=4),
                           max_leaves=12)


class OpenWatch:
    """An audit hook that records every path opened or listed while armed (a hook cannot be removed: it is
    installed once and costs one comparison when disarmed)."""

    root: Path | None = None
    seen: list[str] = []
    installed = False

    @classmethod
    def arm(cls, root: Path) -> None:
        if not cls.installed:
            sys.addaudithook(cls._hook)
            cls.installed = True
        cls.root, cls.seen = root, []

    @classmethod
    def _hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.root is None or event not in ("open", "os.scandir", "os.listdir"):
            return
        path = args[0] if args else None
        if isinstance(path, str | bytes | os.PathLike):
            cls.seen.append(os.fsdecode(path))

    @classmethod
    def outside(cls) -> list[str]:
        assert cls.root is not None
        root = cls.root.resolve()
        return [p for p in cls.seen if not Path(p).resolve().is_relative_to(root)]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_bundle, root / "bundle")
    shutil.copy(tiny_bundle / "speculator" / "tokenizer.json", root / "outside.json")
    return root / "bundle", json.loads((tiny_bundle / "manifest.json").read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifests_load_or_fail_cleanly(fuzz_bundle: tuple[Path, dict[str, Any]], data: st.DataObject
                                                ) -> None:
    bundle, original = fuzz_bundle
    manifest = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(manifest)
        where = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not where:
            manifest = data.draw(json_values) if action == "replace" else manifest
            continue
        parent = manifest
        for key in where[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[where[-1]] = data.draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            parent.pop(where[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=8) | st.sampled_from(HOSTILE_PATHS))] = data.draw(json_values)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    OpenWatch.arm(bundle)
    try:
        load_manifest(bundle, integrity="full")
    except BundleError as e:
        assert "\n" not in str(e)
    finally:
        outside = OpenWatch.outside()
        OpenWatch.root = None
    assert outside == [], f"opened outside the bundle: {outside}"


def test_the_watch_sees_reads_outside(fuzz_bundle: tuple[Path, dict[str, Any]]) -> None:
    """The fuzz's check can fail: reading the neighbour file is reported."""
    bundle, _ = fuzz_bundle
    OpenWatch.arm(bundle)
    (bundle.parent / "outside.json").read_bytes()
    outside = OpenWatch.outside()
    OpenWatch.root = None
    assert outside and outside[0].endswith("outside.json")
