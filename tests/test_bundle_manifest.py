"""Issue 11, findings 3, 7, 8 and 9 (bundle side): a manifest is checked against its schema, against itself and
against its graphs, its paths stay inside the bundle, and every bad one is one BundleError (one CLI line)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from specreason_rt.bundle import Bundle
from specreason_rt.cli import main as cli_main
from specreason_rt.errors import BundleError
from specreason_rt.manifest import load_manifest, sha256_file

Edit = Callable[[dict[str, Any]], Any]


class RawText(str):
    """Returned by an edit: write this text as manifest.json."""


class Replaced:
    """Returned by an edit: write this value as the whole manifest.json (other return values are ignored)."""

    def __init__(self, value: Any) -> None:
        self.value = value


@pytest.fixture()
def bundle(tmp_path: Path, tiny_bundle: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def edit_manifest(bundle: Path, edit: Edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    result = edit(data)
    if isinstance(result, RawText):
        path.write_text(result)
    else:
        path.write_text(json.dumps(result.value if isinstance(result, Replaced) else data))


def rehash(bundle: Path, rel: str) -> None:
    """Record a changed file's new hash and size, as an attacker who edits the manifest would."""
    def update(d: dict[str, Any]) -> None:
        d["files"][rel] = sha256_file(bundle / rel)
        d["sizes"][rel] = (bundle / rel).stat().st_size
    edit_manifest(bundle, update)


def spec(d: dict[str, Any]) -> dict[str, Any]:
    return d["models"]["speculator"]


def arch(d: dict[str, Any]) -> dict[str, Any]:
    return spec(d)["architecture"]


def set_in(get: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Edit:
    return lambda d: get(d).__setitem__(key, value)


def drop(get: Callable[[dict[str, Any]], dict[str, Any]], key: str) -> Edit:
    return lambda d: get(d).pop(key)


def top(d: dict[str, Any]) -> dict[str, Any]:
    return d


def gen(d: dict[str, Any]) -> dict[str, Any]:
    return spec(d)["generation"]


def kv(d: dict[str, Any]) -> dict[str, Any]:
    return spec(d)["kv_cache"]


def first_file(d: dict[str, Any]) -> str:
    return next(iter(d["files"]))


def plain_names(d: dict[str, Any]) -> None:
    kv(d).update(attention="plain", new_key="new_key.{}", new_value="new_value.{}")


def dup_input(d: dict[str, Any]) -> None:
    spec(d)["io"]["inputs"].append(dict(spec(d)["io"]["inputs"][0]))


def three_layers(d: dict[str, Any]) -> None:
    arch(d)["layers"] = 3


def vocab_everywhere(d: dict[str, Any]) -> None:
    """Consistent within the manifest (architecture and logits shape), wrong for the graph."""
    arch(d)["vocab_size"] += 1
    next(o for o in spec(d)["io"]["outputs"] if o["name"] == "logits")["shape"][2] += 1


# (id, edit, words the message must contain). Each is a manifest.json a careless tool or an attacker could write.
MALFORMED: list[tuple[str, Edit, str]] = [
    ("a list", lambda d: Replaced([d]), "not a manifest object"),
    ("a string", lambda d: Replaced("manifest"), "not a manifest object"),
    ("null", lambda d: Replaced(None), "not a manifest object"),
    ("no models", drop(top, "models"), "models"),
    ("no files", drop(top, "files"), "files"),
    ("no speculator", lambda d: d["models"].pop("speculator"), "speculator"),
    ("schema_version as string", set_in(top, "schema_version", "1"), "schema_version"),
    ("wrong schema", set_in(top, "schema", "other"), "schema"),
    ("tokenizers_shared as string", set_in(top, "tokenizers_shared", "false"), "tokenizers_shared"),
    ("unknown precision", set_in(top, "precision", "fp64"), "precision"),
    ("unknown top-level field", set_in(top, "extra", 1), "extra"),
    ("unknown model field", set_in(spec, "extra", 1), "extra"),
    ("vocab_size 0", set_in(arch, "vocab_size", 0), "vocab_size"),
    ("max_context 256.5", set_in(arch, "max_context", 256.5), "max_context"),
    ("max_context 256.0", set_in(arch, "max_context", 256.0), "max_context"),
    ("layers true", set_in(arch, "layers", True), "layers"),
    ("layers 10^9", set_in(arch, "layers", 10**9), "layers"),
    ("kv_heads 10^12", set_in(arch, "kv_heads", 10**12), "kv_heads"),
    ("heads not a multiple of kv_heads", set_in(arch, "heads", 3), "kv_heads"),
    ("family with odd characters", set_in(arch, "family", "Llama!"), "family"),
    ("attention_windows per layer wrong length", set_in(arch, "attention_windows", [None]), "attention_windows"),
    ("role swapped", set_in(spec, "role", "verifier"), "role"),
    ("model precision differs", set_in(spec, "precision", "int8"), "precision"),
    ("eos_ids empty", set_in(gen, "eos_ids", []), "eos_ids"),
    ("pad_id negative", set_in(gen, "pad_id", -1), "pad_id"),
    ("bos_id outside the vocabulary", set_in(gen, "bos_id", 10_000), "vocabulary"),
    ("empty step delimiter", set_in(gen, "step_delimiter", ""), "step_delimiter"),
    ("chat template a number", set_in(gen, "chat_template", 5), "chat_template"),
    ("attention plain on a gqa graph", set_in(kv, "attention", "plain"), "kv_cache"),
    ("plain names on a gqa graph", plain_names, "plain attention"),
    ("unknown attention", set_in(kv, "attention", "flash"), "attention"),
    ("format trick in a kv name", set_in(kv, "past_key", "{:>999999999}{}"), "past_key"),
    ("a tensor listed twice", dup_input, "twice"),
    ("layer count disagrees with the IO", three_layers, "3 layers"),
    ("kv_heads disagrees with the IO shapes", set_in(arch, "kv_heads", 1), "kv_heads"),
    ("file hash not sha256", lambda d: d["files"].__setitem__(first_file(d), "md5:00"), "files"),
    ("files empty", set_in(top, "files", {}), "files"),
    ("model file not listed", lambda d: d["files"].pop(spec(d)["file"]), "not listed"),
    ("tokenizer not listed", lambda d: d["files"].pop(spec(d)["tokenizer"]), "not listed"),
    ("sizes for an unlisted file", lambda d: d["sizes"].__setitem__("x/y", 1), "sizes"),
    ("size differs", lambda d: d["sizes"].__setitem__(first_file(d), 1), "bytes"),
    ("engine for an unknown role", set_in(top, "engines", {"judge": {}}), "engines"),
    ("5000-digit number", lambda d: RawText(json.dumps(d).replace('"max_context": 128',
                                                                  '"max_context": ' + "9" * 5000, 1)), "JSON"),
    ("absolute model file", set_in(spec, "file", "/etc/hostname"), "not a relative path"),
    ("dot-dot tokenizer", set_in(spec, "tokenizer", "speculator/../../outside.json"), "not a relative path"),
    ("absolute key in files", lambda d: d["files"].__setitem__("/etc/hostname", "sha256:" + "0" * 64),
     "not a relative path"),
    ("backslash path", set_in(spec, "file", "verifier\\model.onnx"), "not a relative path"),
]


@pytest.mark.parametrize("edit,needle", [(e, n) for _, e, n in MALFORMED], ids=[i for i, _, _ in MALFORMED])
def test_malformed_manifest_is_one_bundle_error(bundle: Path, edit: Edit, needle: str, capsys) -> None:
    edit_manifest(bundle, edit)
    with pytest.raises(BundleError, match=None) as info:
        load_manifest(bundle)
    assert needle in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert cli_main(["info", "--bundle", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("specreason: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_many_malformed_cases() -> None:
    assert len(MALFORMED) >= 40


def test_nan_infinity_and_huge_floats_are_refused(bundle: Path) -> None:
    text = (bundle / "manifest.json").read_text()
    for bad in ("NaN", "Infinity", "1e999"):
        data = json.loads(text)
        spec(data)["validation"]["max_abs_logit_diff"] = "@"
        (bundle / "manifest.json").write_text(json.dumps(data).replace('"@"', bad))
        with pytest.raises(BundleError, match="not valid JSON"):
            load_manifest(bundle)


def test_deep_nesting_is_one_line(bundle: Path) -> None:
    """Finding 7: depth 1000 (and 100000) in manifest.json, a RecursionError before."""
    for depth in (40, 1000, 100_000):
        (bundle / "manifest.json").write_text('{"schema": "specreason-bundle", "tools": ' + "[" * depth
                                              + "]" * depth + "}")
        with pytest.raises(BundleError, match="nests too deeply"):
            load_manifest(bundle)
    res = subprocess.run([sys.executable, "-m", "specreason_rt.cli", "info", "--bundle", str(bundle)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "nests too deeply" in res.stderr


def test_newer_architecture_facts_are_allowed(bundle: Path) -> None:
    """Optional facts another part of the export writes: windows per layer and named features; new families."""
    def add(d: dict[str, Any]) -> None:
        arch(d).update(attention_windows=[None, 64], features=["qk_norm"], family="some_new_family")
    edit_manifest(bundle, add)
    assert load_manifest(bundle).models["speculator"].architecture.family == "some_new_family"


# Finding 3: paths are confined, every loaded file is listed and hashed, checked before anything is read.

def test_symlink_to_a_file_outside_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-tokenizer.json"
    shutil.copy(bundle / "speculator" / "tokenizer.json", outside)
    (bundle / "speculator" / "tokenizer.json").unlink()
    (bundle / "speculator" / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_manifest(bundle)


def test_symlinked_folder_outside_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    shutil.move(bundle / "speculator", outside)
    (bundle / "speculator").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_manifest(bundle)


def test_symlink_inside_the_bundle_is_fine(bundle: Path) -> None:
    target = bundle / "speculator" / "tokenizer_config.json"
    moved = bundle / "verifier" / "speculator-tokenizer_config.json"
    shutil.move(target, moved)
    target.symlink_to(Path("..") / "verifier" / moved.name)
    edit_manifest(bundle, lambda d: (d["files"].__setitem__(f"verifier/{moved.name}", sha256_file(moved)),
                                     d["sizes"].__setitem__(f"verifier/{moved.name}", moved.stat().st_size)))
    load_manifest(bundle)


def test_manifest_symlinked_outside_is_refused(bundle: Path, tmp_path: Path) -> None:
    shutil.move(bundle / "manifest.json", tmp_path / "m.json")
    (bundle / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_manifest(bundle)


def test_unlisted_files_are_refused(bundle: Path) -> None:
    """A model's external weights are read by ONNX Runtime without the manifest naming them: so no file in
    the bundle may go unlisted (and unhashed)."""
    (bundle / "verifier" / "model.onnx.data").write_bytes(b"\0" * 64)
    with pytest.raises(BundleError, match="does not list.*verifier/model.onnx.data"):
        load_manifest(bundle)


def test_paths_are_checked_before_anything_is_read(bundle: Path, tmp_path: Path) -> None:
    """The tokenizer and a listed file point at a FIFO outside the bundle: reading either would block forever,
    so a run that returns proves nothing outside was opened."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (bundle / "speculator" / "evil").symlink_to(fifo)
    cases = [lambda d: spec(d).__setitem__("tokenizer", "../fifo"),
             lambda d: d["files"].__setitem__("speculator/evil", "sha256:" + "0" * 64)]
    for edit in cases:
        copy = tmp_path / f"case-{cases.index(edit)}"
        shutil.copytree(bundle, copy, symlinks=True)
        edit_manifest(copy, edit)
        script = ("import sys\nfrom specreason_rt.manifest import load_manifest\nfrom specreason_rt.errors import "
                  "BundleError\ntry:\n    load_manifest(sys.argv[1], integrity='full')\nexcept BundleError as e:\n"
                  "    print(e)\n")
        res = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and ("not a relative path" in res.stdout or "outside" in res.stdout), res


# Integrity: sizes at every load, full hashes on request (issue 12, point 2).

def test_a_changed_file_of_the_same_size_is_caught_by_verify(bundle: Path, capsys) -> None:
    path = bundle / "speculator" / "tokenizer_config.json"
    text = path.read_text()
    path.write_text(text.replace("{", "[", 1))  # same size, different bytes
    load_manifest(bundle)  # sizes only: not detected, by design (cheap start-up)
    with pytest.raises(BundleError, match="does not match its hash"):
        load_manifest(bundle, integrity="full")
    assert cli_main(["info", "--bundle", str(bundle), "--verify"]) == 1
    assert "does not match its hash" in capsys.readouterr().err


def test_a_truncated_file_is_caught_at_load(bundle: Path) -> None:
    path = bundle / "verifier" / "model.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="verifier/model.onnx has .* bytes"):
        Bundle(bundle)


def test_bundles_without_sizes_are_hashed_at_load(bundle: Path) -> None:
    edit_manifest(bundle, drop(top, "sizes"))
    path = bundle / "speculator" / "tokenizer_config.json"
    path.write_text(path.read_text().replace("{", "[", 1))
    with pytest.raises(BundleError, match="does not match its hash"):
        load_manifest(bundle)


# The graphs themselves: the manifest's numbers must be the graph's (finding 8), bad graphs are one error.

@pytest.mark.parametrize("edit", [vocab_everywhere], ids=["vocabulary"])
def test_manifest_numbers_are_checked_against_the_graph(bundle: Path, edit: Edit) -> None:
    edit_manifest(bundle, edit)
    load_manifest(bundle)  # consistent in itself
    with pytest.raises(BundleError, match="in the graph but"):
        Bundle(bundle, roles=["speculator"])


def test_layer_count_and_io_consistent_but_not_the_graph(bundle: Path) -> None:
    def add_layer(d: dict[str, Any]) -> None:
        arch(d)["layers"] = 3
        if "attention_windows" in arch(d):  # one window per layer, kept consistent with the count
            arch(d)["attention_windows"].append(None)
        io = spec(d)["io"]
        for side, names in (("inputs", ("past_key", "past_value")), ("outputs", ("present_key", "present_value"))):
            template = next(t for t in io[side] if t["name"].startswith(names[0]))
            io[side] += [dict(template, name=f"{n}.2") for n in names]
    edit_manifest(bundle, add_layer)
    load_manifest(bundle)
    with pytest.raises(BundleError, match="are not in the graph"):
        Bundle(bundle, roles=["speculator"])


@pytest.mark.parametrize("content", [b"garbage" * 100, None], ids=["garbage", "truncated"])
def test_broken_graph_with_updated_hash_is_one_error(bundle: Path, content: bytes | None) -> None:
    path = bundle / "verifier" / "model.onnx"
    path.write_bytes(content if content is not None else path.read_bytes()[: path.stat().st_size // 2])
    rehash(bundle, "verifier/model.onnx")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load this graph"):
        Bundle(bundle, roles=["verifier"])


def test_shared_graph_loads_for_both_roles(tiny_bundle: Path) -> None:
    """One source in both roles: the manifest names one graph file for both (issue 12, point 3)."""
    manifest = load_manifest(tiny_bundle)
    assert manifest.models["speculator"].file == manifest.models["verifier"].file == "verifier/model.onnx"
    assert not (tiny_bundle / "speculator" / "model.onnx").exists()
    b = Bundle(tiny_bundle)
    assert set(b.models) == {"speculator", "verifier"}
