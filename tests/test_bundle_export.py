"""Issue 11 findings 4 and 10, issue 12 points 2 and 3 (export side): --out is locked, --force replaces only a
bundle, publish never deletes what it did not check, signals and kills leave nothing behind for long, the
bundle is readable by others, and bad input fails before any model is loaded."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specreason_export.errors import ExportError
from specreason_export.progress import Progress
from specreason_export.publish import TEMP_MARK, OutputSlot
from specreason_rt.manifest import load_manifest

from .conftest import read_manifest
from .test_export_cli import assert_one_line_error, run_export


def tiny_args(src: Path, out: Path) -> list[str]:
    return ["--speculator", str(src), "--verifier", str(src), "--out", str(out)]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def start_export(src: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "specreason_export.cli", "--quiet", *tiny_args(src, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_temp(out: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> Path:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        found = [p for p in out.parent.glob(f".{out.name}.tmp-*") if (p / TEMP_MARK).is_file()]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no temporary bundle appeared (exit {proc.poll()})")


# --force and --out (finding 4)

def test_force_refuses_what_is_not_a_bundle(tmp_path: Path, capsys, monkeypatch, tiny_llama_dir: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_export(capsys, *tiny_args(tiny_llama_dir, out), "--force")
    assert_one_line_error(code, err, "not a specreason bundle", "--force only replaces a bundle")
    assert (out / "keep.txt").read_text() == "mine"
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    code, err = run_export(capsys, *tiny_args(tiny_llama_dir, Path(".")), "--force")
    assert_one_line_error(code, err, "not a specreason bundle")
    assert (work / "notes.txt").read_text() == "keep"


def test_out_created_during_the_export_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(ExportError, match="created or changed by someone else"), \
            OutputSlot(out=out, force=False) as slot:
        (slot.tmp / "manifest.json").write_text("{}")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        slot.publish()
    assert (out / "theirs.txt").read_text() == "theirs" and leftovers(out) == []


def test_force_replaces_only_the_bundle_it_checked(tmp_path: Path, tiny_bundle: Path) -> None:
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    with pytest.raises(ExportError, match="created or changed by someone else"), \
            OutputSlot(out=out, force=True) as slot:
        shutil.rmtree(out)
        shutil.copytree(tiny_bundle, out)  # another bundle now: not the one checked at the start
        (out / "theirs.txt").write_text("theirs")
        slot.publish()
    assert (out / "theirs.txt").is_file() and leftovers(out) == []


def test_second_export_to_the_same_out_refuses_at_once(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    with OutputSlot(out=out, force=False):
        code, err = run_export(capsys, *tiny_args(tiny_llama_dir, out))
        assert_one_line_error(code, err, "another specreason-export", str(os.getpid()))
    assert not out.exists() and leftovers(out) == []


@pytest.mark.slow
def test_concurrent_exports_one_wins(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    procs = [start_export(tiny_llama_dir, out) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read() if p.stderr else "") for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert "another specreason-export" in loser or "already exists" in loser
    load_manifest(out, integrity="full")
    assert leftovers(out) == []


# Temporary directories, signals, crashes, writability (finding 10)

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_signals_clean_up_like_ctrl_c(tmp_path: Path, tiny_llama_dir: Path, sig: signal.Signals) -> None:
    out = tmp_path / "b"
    proc = start_export(tiny_llama_dir, out)
    wait_for_temp(out, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130
    assert "interrupted" in (proc.stderr.read() if proc.stderr else "")
    assert not out.exists() and leftovers(out) == []


def test_a_killed_exports_temp_dir_is_cleaned_by_the_next(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    foreign = tmp_path / ".b.tmp-not-ours"  # same name pattern, no mark inside: not ours to delete
    foreign.mkdir()
    proc = start_export(tiny_llama_dir, out)
    stale = wait_for_temp(out, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert stale.is_dir()  # kill -9 cannot be handled: the next export cleans up
    code, err = run_export(capsys, *tiny_args(tiny_llama_dir, out))
    assert code == 0, err
    assert not stale.exists() and foreign.is_dir() and leftovers(out) == [foreign.name]


def test_a_crash_between_the_fallback_renames_keeps_the_old_bundle(tmp_path: Path, monkeypatch,
                                                                    tiny_bundle: Path) -> None:
    """Without renameat2 (other systems), replacing takes two renames; a crash between them leaves the old
    bundle aside, and the next export puts it back before anything else."""
    import specreason_export.publish as publish

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    created = read_manifest(out)["created"]
    real_rename, calls = os.rename, []

    def crash_on_second(src: str, dst: str) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(publish, "_renameat2", lambda src, dst, flags: False)
    monkeypatch.setattr(publish.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt), OutputSlot(out=out, force=True) as slot:
        shutil.copytree(tiny_bundle, slot.tmp, dirs_exist_ok=True)
        slot.publish()
    monkeypatch.undo()
    assert not out.exists()  # the crash window
    with OutputSlot(out=out, force=True):
        assert read_manifest(out)["created"] == created  # restored first
    assert leftovers(out) == []


def test_replacing_swaps_atomically(tmp_path: Path, tiny_bundle: Path) -> None:
    """renameat2(RENAME_EXCHANGE): --out holds a bundle at every instant; the old one is gone afterwards."""
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    (out / "manifest.json").write_text((out / "manifest.json").read_text().replace('"created": "', '"created": "old'))
    with OutputSlot(out=out, force=True) as slot:
        shutil.copytree(tiny_bundle, slot.tmp, dirs_exist_ok=True)
        slot.publish()
    assert not read_manifest(out)["created"].startswith("old") and leftovers(out) == []


def test_read_only_parent_fails_before_any_model_loads(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    """A read-only file system (root ignores mode bits, so a real one): the error is about --out, although the
    speculator's weights are corrupt, which loading would have reported first."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {res.stderr.decode().strip()}")
    try:
        broken = tmp_path / "broken"
        shutil.copytree(tiny_llama_dir, broken)
        (broken / "model.safetensors").write_bytes(b"\0" * 100)
        code, err = run_export(capsys, "--speculator", str(broken), "--out", str(mnt / "b"))
        assert_one_line_error(code, err, "not writable")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# Permissions (issue 12, point 2)

def test_bundle_is_published_with_the_umasks_permissions(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    out = tmp_path / "b"
    old = os.umask(0o022)
    try:
        code, err = run_export(capsys, *tiny_args(tiny_llama_dir, out))
    finally:
        os.umask(old)
    assert code == 0, err
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


# Fail fast (issue 12, point 3)

def test_both_sources_are_checked_before_loading(tmp_path: Path, capsys, tiny_llama_dir: Path) -> None:
    """The verifier's family is refused although the speculator's weights are corrupt (which loading would
    have reported first): only config.json files were read."""
    from transformers import GPT2Config, GPT2LMHeadModel

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    out = tmp_path / "b"
    code, err = run_export(capsys, "--speculator", str(broken), "--verifier", str(gpt2), "--out", str(out))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")
    code, err = run_export(capsys, "--speculator", str(broken), "--verifier", "no-such-verifier", "--out", str(out))
    assert_one_line_error(code, err, "unknown source 'no-such-verifier'")
    assert not out.exists() and leftovers(out) == []


def test_hub_id_without_network_is_one_line_without_retries(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """No HF_HUB_OFFLINE: the real network (none on this machine) is tried once, briefly."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    res = subprocess.run([sys.executable, "-m", "specreason_export.cli", "--speculator", str(tiny_llama_dir),
                          "--verifier", "someorg/no-such-model", "--out", str(tmp_path / "b"),
                          "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1 and "someorg/no-such-model" in lines[0], res.stderr
    assert "Retry" not in res.stderr


def _fake_hub_cache(cache: Path, repo: str, revision: str, files_from: Path) -> None:
    """The hub client's cache layout: refs/<revision> names a snapshot folder holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)
    shutil.copytree(files_from, root / "snapshots" / commit)


def test_hub_id_from_a_cache_dir_at_a_revision(tmp_path: Path, capsys, monkeypatch, tiny_llama_dir: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # deterministic with or without network
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "someorg/tiny", "v1", tiny_llama_dir)
    out = tmp_path / "b"
    args = ["--speculator", "someorg/tiny", "--verifier", "someorg/tiny", "--out", str(out), "--cache-dir", str(cache)]
    code, err = run_export(capsys, *args, "--revision", "v2")
    assert_one_line_error(code, err, "someorg/tiny", "not in the local hub cache")
    code, err = run_export(capsys, *args, "--revision", "v1", "--token", "unused-offline")
    assert code == 0, err
    manifest = load_manifest(out)
    assert manifest.models["verifier"].source["id"] == "someorg/tiny"
    assert [p.name for p in out.rglob("model.onnx")] == ["model.onnx"]  # one source, one graph


# Progress (issue 12, point 3)

def test_library_progress_bars_are_routed_through_ours(capsys) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from specreason_export.sources import _bars_through

    with _bars_through(Progress(total=1)):
        assert sum(gguf_utils.tqdm(range(40), desc="Converting and de-quantizing GGUF tensors...")) == 780
    err = capsys.readouterr().err
    assert "\r" not in err and "Converting and de-quantizing GGUF tensors: 40/40" in err
    assert len(err.splitlines()) <= 5  # a few lines, not one per item


def test_long_stages_report_that_they_still_run(capsys) -> None:
    progress = Progress(total=1, heartbeat_s=0.05)
    seen = ""
    with progress.stage("validate"):
        end = time.monotonic() + 30
        while "still running" not in seen and time.monotonic() < end:
            time.sleep(0.02)
            seen += capsys.readouterr().err
    assert "[1/1] validate ..." in seen and "still running" in seen


def test_bad_sources_fail_before_torch_is_imported(tmp_path: Path) -> None:
    """A typo or an unreachable hub id is reported before the export stack (torch) is even imported."""
    script = ("import sys\nfrom specreason_export.cli import main\n"
              "code = main(['--speculator', sys.argv[1], '--out', sys.argv[2]])\n"
              "assert code == 1 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for spec in ("no-such-model", "someorg/no-such-model"):
        res = subprocess.run([sys.executable, "-c", script, spec, str(tmp_path / "b")], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stderr.count("specreason-export: error:") == 1
