"""The model-repository artifact (service/modelprep/package.py): packaged with a sha256 manifest, installed the way
the chart's model-setup init container does it (from a file, a directory or an HTTP URL), and refused whenever a
checksum, a file or an archive member cannot be trusted."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from service.modelprep import package as pkg
from service.triton import model_config as mcfg

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repository(tmp_path) -> Path:
    """A repository with the committed configs and small stand-in version directories (bytes, not a model)."""
    root = tmp_path / "repo"
    for variant in ("int8", "fp16"):
        model = root / f"classifier_{variant}"
        (model / "1").mkdir(parents=True)
        (model / "config.pbtxt").write_text((REPO_ROOT / "model_repository" / model.name / "config.pbtxt").read_text())
        (model / "1" / "model.onnx").write_bytes(variant.encode() * 1000)
        (model / "1" / "tokenizer.json").write_text("{}")
        (model / "1" / "provenance.json").write_text(json.dumps({"variant": variant, "git_sha": "abc"}))
    (root / "classifier_draft").mkdir()  # a config without any version: not a built model, not packaged
    (root / "classifier_draft" / "config.pbtxt").write_text("name: 'classifier_draft'")
    return root


def test_package_writes_a_reproducible_archive_with_manifest_and_checksum(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1.2.0")
    assert archive.name == "loraserve-models-1.2.0.tar.gz"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (tmp_path / "out" / "loraserve-models-1.2.0.tar.gz.sha256").read_text() == f"{digest}  {archive.name}\n"
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile(pkg.MANIFEST_NAME))
    assert names[0] == pkg.MANIFEST_NAME
    assert sorted(manifest["models"]) == ["classifier_fp16", "classifier_int8"]
    assert manifest["models"]["classifier_int8"] == {
        "versions": [1],
        "provenance": {"1": {"variant": "int8", "git_sha": "abc"}},
    }
    model = repository / "classifier_int8" / "1" / "model.onnx"
    entry = manifest["files"]["classifier_int8/1/model.onnx"]
    assert entry == {"sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "size": model.stat().st_size}
    # Same repository, same bytes (timestamps and owners are normalized), apart from the manifest's creation time.
    again = pkg.package_repository(repository, tmp_path / "again", version="1.2.0")
    with tarfile.open(again) as tar:
        assert tar.getnames() == names


def test_install_verifies_and_writes_the_targets_configs(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1")
    configs = tmp_path / "configs"
    mcfg.render_target_files("gpu", configs, ["fp16"])
    dest = tmp_path / "models"
    manifest = pkg.install(str(archive), dest, sha256=pkg.sha256_file(archive), configs=configs)
    assert manifest["version"] == "1"
    # Only the configured variant is served, with the GPU config rendered for it.
    assert sorted(p.name for p in dest.iterdir()) == [pkg.MANIFEST_NAME, "classifier_fp16"]
    served = mcfg.load_and_validate(dest / "classifier_fp16")
    assert served.backend == "onnxruntime"
    assert (dest / "classifier_fp16" / "1" / "model.onnx").read_bytes() == b"fp16" * 1000
    # A restarted init container replaces what an earlier attempt left behind.
    (dest / "leftover").write_text("x")
    pkg.install(str(archive), dest, configs=configs)
    assert not (dest / "leftover").exists()


def test_a_wrong_checksum_is_refused_before_extraction(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1")
    with pytest.raises(pkg.PackageError, match="sha256 .* != expected"):
        pkg.install(str(archive), tmp_path / "models", sha256="0" * 64)
    assert not list((tmp_path / "models").iterdir())  # nothing half-installed for Triton to load


def test_a_modified_file_is_named(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1")
    tree = tmp_path / "tree"
    pkg.extract_archive(archive, tree)
    (tree / "classifier_int8" / "1" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(pkg.PackageError, match="classifier_int8/1/model.onnx: sha256 differs"):
        pkg.install(str(tree), tmp_path / "models")


def test_unsafe_archive_members_are_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../outside.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(pkg.PackageError, match="unsafe member"):
        pkg.extract_archive(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_configs_for_a_variant_the_artifact_lacks_are_refused(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "classifier_small_int8.pbtxt").write_text("name: 'classifier_small_int8'")
    with pytest.raises(pkg.PackageError, match=r"configs for \['classifier_small_int8'\]"):
        pkg.install(str(archive), tmp_path / "models", configs=configs)


def test_install_from_an_http_url_needs_and_checks_the_sha256(repository, tmp_path):
    archive = pkg.package_repository(repository, tmp_path / "out", version="1")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{archive.name}"
        with pytest.raises(pkg.PackageError, match="needs --sha256"):
            pkg.install(url, tmp_path / "models")
        rc = pkg.main(["install", "--source", url, "--sha256", pkg.sha256_file(archive), "--dest", str(tmp_path / "m")])
        assert rc == 0
        assert pkg.verify_tree(tmp_path / "m")["models"]["classifier_int8"]["versions"] == [1]
        assert pkg.main(["install", "--source", url, "--sha256", "1" * 64, "--dest", str(tmp_path / "n")]) == 2
        # A presigned URL's signature never reaches the logs.
        with pytest.raises(pkg.PackageError) as failed:
            pkg.download(f"http://127.0.0.1:{server.server_port}/missing.tar.gz?X-Amz-Signature=secret", tmp_path / "x")
        assert "secret" not in str(failed.value) and "missing.tar.gz" in str(failed.value)
    finally:
        server.shutdown()
        server.server_close()


def test_modelprep_cli_has_the_package_command(repository, tmp_path, capsys):
    from service.modelprep.cli import main

    rc = main(["package", "--repository", str(repository), "--output", str(tmp_path / "out"), "--version", "7"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["archive"]).name == "loraserve-models-7.tar.gz" and len(out["sha256"]) == 64
