"""pipeline.storage: local paths and a real S3-compatible server (SeaweedFS), same interface."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import storage
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


def test_staged_dir_publishes_whole_or_nothing(tmp_path: Path) -> None:
    final = str(tmp_path / "ds")
    with storage.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "part.bin"), b"v1")
        assert not storage.exists(final)  # nothing visible before the commit
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 1})
    assert storage.read_bytes(storage.join(final, "part.bin")) == b"v1"

    # A crash while writing the next version leaves the old one untouched and no temporary folder.
    with pytest.raises(RuntimeError), storage.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "part.bin"), b"half")
        raise RuntimeError("boom")
    assert storage.read_bytes(storage.join(final, "part.bin")) == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]

    # A new version replaces the old one entirely (stale files go).
    with storage.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(storage.join(tmp, "other.bin"), b"v2")
        storage.write_json(storage.join(tmp, "manifest.json"), {"v": 2})
    assert sorted(p.name for p in Path(final).iterdir()) == ["manifest.json", "other.bin"]

    # A folder without its marker file is never published.
    with pytest.raises(PipelineError, match="manifest.json missing"), storage.staged_dir(final, "manifest.json") as tmp:
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

    final = f"{base}/ds"
    with storage.staged_dir(final, "manifest.json") as tmp:
        storage.write_bytes(f"{tmp}/train/part-0.bin", b"one")
        storage.write_bytes(f"{tmp}/stale.bin", b"old")
        storage.write_json(f"{tmp}/manifest.json", {"v": 1})
    with storage.staged_dir(final, "manifest.json") as tmp:
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
    from pipeline import sessions
    from pipeline.config import BuildConfig
    from pipeline.generate import generate_clicks
    from pipeline.validate import validate

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
