"""pipeline.storage: local paths and a real S3-compatible server (SeaweedFS), same interface."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import publish, storage
from pipeline.errors import InputError, PipelineError


def test_local_round_trips_and_listing(tmp_path: Path) -> None:
    root = str(tmp_path / "store")
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "b.json"), {"z": 1, "a": [1, 2]})
    storage.write_bytes(storage.join(root, "_SUCCESS"), b"")
    storage.write_bytes(storage.join(root, ".hidden", "y.bin"), b"y")
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(root, "b.json")) == {"z": 1, "a": [1, 2]}
    # Stable JSON: sorted keys, so re-written reports and manifests diff cleanly.
    assert storage.read_bytes(storage.join(root, "b.json")).startswith(b'{\n  "a"')
    assert storage.list_files(root) == [storage.join(root, "a", "x.bin"), storage.join(root, "b.json")]
    assert storage.is_dir(root) and storage.exists(storage.join(root, "b.json"))
    assert not storage.exists(storage.join(root, "nope"))
    with pytest.raises(InputError, match="input not found"):
        storage.expand([storage.join(root, "nope")])


def test_resolve_local_and_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = storage.resolve("file:///tmp/x/../y")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/y"
    monkeypatch.setenv("PIPELINE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.resolve("s3://bucket/some/key/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/key"
    with pytest.raises(InputError, match="not a valid S3 URI"):
        storage.resolve("s3://")
    with pytest.raises(PipelineError, match="root of a store"), publish.staged_dir("s3://bucket/", "m.json"):
        pass


def test_content_addressed_names() -> None:
    name = publish.content_name("part-00003", b"rows", ".parquet")
    assert name == f"part-00003-{hashlib.sha256(b'rows').hexdigest()[:16]}.parquet"
    assert publish.is_content_addressed(f"train/{name}") and publish.is_content_addressed("x-" + "ab" * 32)
    assert not publish.is_content_addressed("part-00003.parquet")
    assert not publish.is_content_addressed("data_docs/index.html")


def test_staged_dir_publishes_whole_or_nothing(tmp_path: Path) -> None:
    final = str(tmp_path / "ds")
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "part.bin"), b"v1")
        assert not storage.exists(final)  # nothing visible before the commit
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 1})
    assert storage.read_bytes(storage.join(final, "part.bin")) == b"v1"

    # A crash while writing the next version leaves the old one untouched and no temporary folder.
    with pytest.raises(RuntimeError), publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "part.bin"), b"half")
        raise RuntimeError("boom")
    assert storage.read_bytes(storage.join(final, "part.bin")) == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    # A new version replaces the old one entirely (stale files go).
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "other.bin"), b"v2")
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 2})
    assert sorted(p.name for p in Path(final).iterdir()) == ["manifest.json", "other.bin"]

    # A folder without its marker file is never published.
    with pytest.raises(PipelineError, match="manifest.json missing"), publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "x.bin"), b"x")
    assert storage.read_json(storage.join(final, "manifest.json")) == {"v": 2}


def test_outputs_may_not_overlap_inputs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    with pytest.raises(PipelineError, match="overlaps input"):
        storage.check_disjoint([str(raw)], str(raw / "out"))
    with pytest.raises(PipelineError, match="overlaps input"):
        storage.check_disjoint([str(raw / "dt=2024-01-01")], str(raw))
    storage.check_disjoint([str(raw)], str(tmp_path / "raw-out"))  # a shared prefix is not an overlap


@pytest.mark.integration
def test_s3_round_trips_and_staged_publish(s3_env: str) -> None:
    base = s3_env
    storage.write_bytes(f"{base}/in/a.bin", b"abc")
    storage.write_json(f"{base}/in/b.json", {"k": "v"})
    storage.write_bytes(f"{base}/in/_SUCCESS", b"")
    assert storage.read_bytes(f"{base}/in/a.bin") == b"abc"
    assert storage.read_bytes(f"{base}/in/a.bin", limit=2) == b"ab"
    assert storage.read_json(f"{base}/in/b.json") == {"k": "v"}
    assert storage.list_files(f"{base}/in") == [f"{base}/in/a.bin", f"{base}/in/b.json"]
    assert storage.exists(f"{base}/in") and storage.is_dir(f"{base}/in") and not storage.exists(f"{base}/none")
    assert storage.size(f"{base}/in/a.bin") == 3

    # Names without a content hash are overwritten, even by bytes of the same size.
    final = f"{base}/ds"
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(f"{tmp}/train/part-0.bin", b"one")
        storage.write_bytes(f"{tmp}/stale.bin", b"old")
        storage.write_json(f"{tmp}/manifest.json", {"v": 1})
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(f"{tmp}/train/part-0.bin", b"two")
        storage.write_json(f"{tmp}/manifest.json", {"v": 2})
    assert storage.list_files(final) == [f"{final}/manifest.json", f"{final}/train/part-0.bin"]
    assert storage.read_bytes(f"{final}/train/part-0.bin") == b"two"
    assert storage.read_json(f"{final}/manifest.json") == {"v": 2}
    assert storage.list_files(base) == sorted(storage.list_files(f"{base}/in") + storage.list_files(final))

    storage.remove(f"{base}/in")
    assert not storage.exists(f"{base}/in/a.bin")


@pytest.mark.integration
def test_generate_validate_build_on_s3(s3_env: str) -> None:
    """The whole data layer against a real S3 server: raw logs, validation output and dataset all on S3."""
    from pipeline.config import BuildConfig
    from pipeline.data import sessions
    from pipeline.data.generate import generate_clicks
    from pipeline.data.validate import validate

    uris = generate_clicks(f"{s3_env}/raw", days=2, sessions_per_day=200, n_items=60, seed=4, corruption={"duplicate": 0.005})
    assert uris == [f"{s3_env}/raw/dt=2024-01-01", f"{s3_env}/raw/dt=2024-01-02"]
    report = validate([f"{s3_env}/raw"], f"{s3_env}/validated")
    assert report["success"] and report["rows_quarantined"] == report["quarantine_reasons"]["duplicate_event"] > 0
    assert storage.read_json(f"{s3_env}/validated/report.json")["rows_valid"] == report["rows_valid"]
    assert storage.exists(f"{s3_env}/validated/data_docs/index.html")
    manifest = sessions.build_dataset(
        [f"{s3_env}/validated"], f"{s3_env}/dataset", build=BuildConfig(test_days=0.5, valid_days=0.5, min_item_support=1)
    )
    train = sessions.read_split(f"{s3_env}/dataset", "train")
    assert train.num_rows == manifest["counts"]["train"]["events"] > 0
    fs, root = storage.resolve(s3_env)
    every = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))]
    assert every and not [p for p in every if "/." in p]  # no temporary prefixes left behind


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs


def _age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` and of everything under it ``seconds`` into the past."""
    when = time.time() - seconds
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        os.utime(p, (when, when))


def _leftover(parent: Path, name: str, age_s: float = 0.0) -> Path:
    folder = parent / name
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "part.bin").write_bytes(b"half")
    _age(folder, age_s)
    return folder


def test_staged_dir_sweeps_stale_leftovers_of_the_same_output_only(tmp_path: Path, caplog) -> None:
    seven_hours = 7 * 3600
    stale = _leftover(tmp_path, ".ds.tmp-0123456789ab", seven_hours)
    stale_swap = _leftover(tmp_path, ".ds.old-0123456789ab", seven_hours)
    kept = [
        _leftover(tmp_path, ".ds.tmp-fedcba987654"),  # a writer of ds that is still running
        _leftover(tmp_path, ".ds2.tmp-0123456789ab", seven_hours),  # another output's
        _leftover(tmp_path, ".ds.tmp-a.tmp-0123456789ab", seven_hours),  # output "ds.tmp-a"'s
        _leftover(tmp_path, ".ds.tmp-notanid", seven_hours),  # not a name staged_dir makes
    ]
    final = str(tmp_path / "ds")
    (tmp_path / "ds").mkdir()  # a published version exists, so .ds.old-* is a leftover, not the only copy
    with caplog.at_level(logging.WARNING, logger="pipeline.publish"):
        with publish.staged_dir(final, "m.json") as tmp:
            storage.write_json(storage.join(tmp, "m.json"), {"v": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in kept] + ["ds"])
    swept = {r.args[0] for r in caplog.records if "killed run" in r.getMessage()}
    assert swept == {str(stale), str(stale_swap)}
    assert "(untouched for 7.0 h)" in caplog.text
    # One second short of the limit is not stale yet; the limit can be lowered.
    _age(kept[0], publish.STALE_STAGING_SECONDS - 1)
    assert publish.sweep_stale_staging(final) == []
    assert publish.sweep_stale_staging(final, older_than_s=60) == [str(kept[0])]


def test_sweep_keeps_the_previous_version_when_the_output_is_missing(tmp_path: Path, caplog) -> None:
    """A local publish killed between its two renames leaves no output, only .NAME.old-*: never delete it."""
    old = _leftover(tmp_path, ".ds.old-0123456789ab", 7 * 3600)
    with caplog.at_level(logging.WARNING, logger="pipeline.publish"):
        assert publish.sweep_stale_staging(str(tmp_path / "ds"), older_than_s=0) == []
    assert old.exists() and "rename it back to restore it" in caplog.text


def test_a_killed_build_leaves_staging_that_a_later_build_sweeps(tmp_path: Path) -> None:
    final = str(tmp_path / "ds")
    writer = (
        "import sys, time\n"
        "from pipeline import publish, storage\n"
        "with publish.staged_dir(sys.argv[1], 'manifest.json') as tmp:\n"
        "    storage.write_bytes(storage.join(tmp, 'train', 'part-0.bin'), b'half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, final], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()  # SIGKILL: no exception handler runs, the staging folder stays
        proc.wait(timeout=30)
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp-")]
    assert (leftover / "train" / "part-0.bin").read_bytes() == b"half"

    # The leftover is fresh (for all we know its writer is still running): it stays.
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 1})
    assert leftover.exists()
    _age(leftover, publish.STALE_STAGING_SECONDS + 60)
    with publish.staged_dir(final, "manifest.json") as tmp:
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert storage.read_json(storage.join(final, "manifest.json")) == {"v": 2}


@pytest.mark.integration
def test_s3_sweep_removes_only_this_outputs_stale_staging(s3_env: str) -> None:
    final = f"{s3_env}/ds"
    storage.write_json(f"{final}/manifest.json", {"v": 1})
    leftovers = [f"{s3_env}/.ds.tmp-0123456789ab", f"{s3_env}/.ds.old-0123456789ab"]
    others = [f"{s3_env}/{name}.tmp-0123456789ab" for name in (".ds2", ".dsx", "ds")]
    for prefix in leftovers + others:
        storage.write_bytes(f"{prefix}/train/part.bin", b"half")
    assert publish.sweep_stale_staging(final) == []  # written just now: a live writer's, as far as we know
    assert all(storage.exists(p) for p in leftovers)
    assert sorted(publish.sweep_stale_staging(final, older_than_s=0)) == sorted(leftovers)
    assert not any(storage.exists(p) for p in leftovers)
    assert all(storage.exists(p) for p in others) and storage.read_json(f"{final}/manifest.json") == {"v": 1}


# ---------------------------------------------------------------------------------------------
# S3 publishes: immutable content-addressed files, the marker as the one atomic switch


def _stage(parent: str, name: str, version: int, n_files: int) -> tuple[str, dict[str, str]]:
    """A finished staging folder: content-addressed files and a manifest that holds each file's sha256."""
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
    files = {}
    for i in range(n_files):
        data = f"version {version} file {i} ".encode() * (1 + (version * 7 + i) % 5)
        relative = f"train/{publish.content_name(f'part-{i:05d}', data, '.bin')}"
        storage.write_bytes(f"{tmp}/{relative}", data)
        files[relative] = hashlib.sha256(data).hexdigest()
    storage.write_json(f"{tmp}/manifest.json", {"version": version, "files": files})
    return tmp, files


def _read_files(final: str, manifest: dict, mismatches: list[str]) -> int:
    """Read each file the manifest lists; one whose bytes do not match its sha256 goes to ``mismatches``."""
    for relative, digest in manifest["files"].items():
        if hashlib.sha256(storage.read_bytes(f"{final}/{relative}")).hexdigest() != digest:
            mismatches.append(f"{relative} of version {manifest['version']}")
    return manifest["version"]


@pytest.mark.integration
def test_s3_readers_that_follow_the_marker_always_see_a_complete_version(s3_env: str) -> None:
    final = f"{s3_env}/ds"
    tmp, files = _stage(s3_env, "ds", 1, n_files=8)
    publish.publish(tmp, final, "manifest.json")
    seen = {"complete": 0, "calls": 0}  # calls - complete: retries after a listed file vanished
    versions: set[int] = set()
    mismatches: list[str] = []
    errors: list[BaseException] = []  # "no manifest.json" would be one
    stop = threading.Event()

    def read(manifest: dict) -> int:
        seen["calls"] += 1
        return _read_files(final, manifest, mismatches)

    def reader() -> None:
        while not stop.is_set():
            try:
                versions.add(publish.read_committed(final, "manifest.json", read))
            except BaseException as exc:
                errors.append(exc)
                return
            seen["complete"] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        last = 5
        for version in range(2, last + 1):
            tmp, files = _stage(s3_env, "ds", version, n_files=8)
            published = publish.publish(tmp, final, "manifest.json")
            assert len(published.removed) == 8 and not published.reused  # every name is new
        deadline = time.monotonic() + 10
        while last not in versions and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors and not mismatches, (errors, mismatches)
    assert seen["complete"] > 0 and last in versions and len(versions) >= 2, (seen, versions)
    # Only the last version's files and its marker remain, and no staging prefix.
    assert storage.list_files(final) == sorted([f"{final}/manifest.json"] + [f"{final}/{r}" for r in files])
    fs, root = storage.resolve(s3_env)
    every = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.is_file]
    assert not [p for p in every if "/." in p]


def test_read_committed_retries_only_when_the_marker_changed(tmp_path: Path) -> None:
    final = str(tmp_path / "ds")
    with pytest.raises(InputError, match="has no manifest.json"):
        publish.read_committed(final, "manifest.json", lambda m: m)
    storage.write_json(storage.join(final, "manifest.json"), {"v": 1})
    calls: list[int] = []

    def read(manifest: dict) -> int:
        calls.append(manifest["v"])
        if manifest["v"] == 1:
            storage.write_json(storage.join(final, "manifest.json"), {"v": 2})  # published meanwhile
            raise InputError("file not found: a part of v1")
        return manifest["v"]

    assert publish.read_committed(final, "manifest.json", read) == 2 and calls == [1, 2]

    def broken(manifest: dict) -> int:
        calls.append(manifest["v"])
        raise InputError("not a readable Parquet file")

    calls.clear()
    with pytest.raises(InputError, match="not a readable Parquet file"):
        publish.read_committed(final, "manifest.json", broken)  # same marker after the error: a real one
    assert calls == [2]


@pytest.mark.integration
def test_s3_republishing_identical_content_copies_only_the_marker(s3_env: str) -> None:
    final = f"{s3_env}/ds"
    tmp, files = _stage(s3_env, "ds", 1, n_files=3)
    storage.write_bytes(f"{tmp}/data_docs/index.html", b"<p>run 1</p>")
    first = publish.publish(tmp, final, "manifest.json")
    assert sorted(first.copied) == sorted([*files, "data_docs/index.html", "manifest.json"])
    assert not first.reused

    tmp, again = _stage(s3_env, "ds", 1, n_files=3)
    assert again == files
    storage.write_bytes(f"{tmp}/data_docs/index.html", b"<p>run 2</p>")  # same size, other bytes, no hash
    storage.write_bytes(f"{final}/train/leftover-0123456789abcdef.bin", b"of a killed publish")
    second = publish.publish(tmp, final, "manifest.json")
    assert sorted(second.reused) == sorted(files)  # same content-addressed name and size: not copied again
    assert second.copied == ("data_docs/index.html", "manifest.json")
    assert second.removed == ("train/leftover-0123456789abcdef.bin",)
    assert storage.read_bytes(f"{final}/data_docs/index.html") == b"<p>run 2</p>"
    mismatches: list[str] = []
    assert publish.read_committed(final, "manifest.json", lambda m: _read_files(final, m, mismatches)) == 1
    assert not mismatches
    assert storage.list_files(final) == sorted(
        [f"{final}/{r}" for r in files] + [f"{final}/data_docs/index.html", f"{final}/manifest.json"]
    )
