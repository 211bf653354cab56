"""A built model repository as one versioned, checksummed artifact, and its installation into a serving pod.

``python -m service.modelprep package`` turns a model repository (``<model>/config.pbtxt`` +
``<model>/<version>/``) into ``<name>-<version>.tar.gz`` with a ``MANIFEST.json`` inside (sha256 and size of every
file, the provenance of every model version, the git sha) and a ``<archive>.sha256`` beside it. Images never
carry models: the chart delivers this artifact (docs/deployment.md) as

* ``url``: the model-setup init container downloads it over HTTP(S) (an S3-compatible bucket: a presigned or
  public object URL) and checks the archive's sha256 before anything is extracted;
* ``image``: an OCI "model image" (KServe's modelcar pattern; ``Dockerfile.model``) whose init container copies
  the archive into the pod;
* ``pvc``: a PersistentVolumeClaim holding the archive (or an already extracted repository).

``python -m service.modelprep.package install`` is what the init container runs (the gateway image: standard
library only, no torch): get the artifact, verify it, extract it, check every file against the manifest, then
write the Triton config the chart rendered for the pod's target (CPU or GPU) into each model directory.
A new model version is then a values change (``modelRepository.url`` + ``sha256``, or the model image's tag).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

MANIFEST_NAME = "MANIFEST.json"
FORMAT = "loraserve-model-repository/1"
CONFIG_FILE = "config.pbtxt"
CHUNK_BYTES = 1 << 20
DOWNLOAD_TIMEOUT_SECONDS = 60.0
DOWNLOAD_ATTEMPTS = 3


class PackageError(RuntimeError):
    """An artifact that cannot be built, fetched or trusted; the message says which file and why."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _model_dirs(repository: Path) -> list[Path]:
    dirs = sorted(p.parent for p in repository.glob(f"*/{CONFIG_FILE}"))
    return [d for d in dirs if any(v.is_dir() and v.name.isdigit() for v in d.iterdir())]


def build_manifest(repository: Path, *, name: str, version: str) -> dict:
    """Describe every file of a built repository: sha256, size, and each model version's provenance.

    Args:
        repository: The model repository directory.
        name: The artifact's name (``loraserve-models``).
        version: The artifact's version (the model version operators roll forward and back).

    Returns:
        The manifest (JSON-serializable).

    Raises:
        PackageError: If the repository has no built model (a config with at least one version directory).
    """
    repository = Path(repository)
    models = _model_dirs(repository)
    if not models:
        raise PackageError(f"{repository}: no built model (<model>/{CONFIG_FILE} with a <version>/ directory)")
    files: dict[str, dict] = {}
    described: dict[str, dict] = {}
    for model_dir in models:
        versions = sorted(
            (v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()), key=lambda v: int(v.name)
        )
        provenance = {}
        for v in versions:
            prov = v / "provenance.json"
            provenance[v.name] = json.loads(prov.read_text()) if prov.is_file() else None
        described[model_dir.name] = {"versions": [int(v.name) for v in versions], "provenance": provenance}
        paths = [model_dir / CONFIG_FILE] + [p for v in versions for p in sorted(v.rglob("*"))]
        for path in paths:
            if path.is_symlink():
                raise PackageError(f"{path}: symbolic links are not packaged (copy the file into the repository)")
            if path.is_file() and "__pycache__" not in path.parts:
                rel = path.relative_to(repository).as_posix()
                files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": _git_sha(),
        "models": described,
        "files": files,
    }


def _tar_info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, mode, 0  # reproducible: same files, same archive bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def package_repository(repository: Path, output_dir: Path, *, name: str = "loraserve-models", version: str) -> Path:
    """Write ``<output_dir>/<name>-<version>.tar.gz`` (+ ``.sha256``) from a built repository.

    Args:
        repository: The model repository directory.
        output_dir: Where the archive and its checksum file go.
        name: The artifact's name.
        version: The artifact's version (letters, digits, ``.``, ``_``, ``-``).

    Returns:
        The archive's path.

    Raises:
        PackageError: If the repository holds no built model or the version is not a safe file name part.
    """
    if not version or not all(c.isalnum() or c in "._-" for c in version):
        raise PackageError(f"version {version!r} must be letters, digits, '.', '_' or '-'")
    repository, output_dir = Path(repository), Path(output_dir)
    manifest = build_manifest(repository, name=name, version=version)
    output_dir.mkdir(parents=True, exist_ok=True)
    archive = output_dir / f"{name}-{version}.tar.gz"
    tmp = archive.with_name(archive.name + ".tmp")
    # mtime=0 in the gzip header too, so two packagings of the same repository give the same sha256.
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        data = json.dumps(manifest, indent=2, sort_keys=True).encode()
        tar.addfile(_tar_info(MANIFEST_NAME, len(data), 0o644), io.BytesIO(data))
        for rel in sorted(manifest["files"]):
            with open(repository / rel, "rb") as f:
                tar.addfile(_tar_info(rel, manifest["files"][rel]["size"], 0o644), f)
    os.replace(tmp, archive)
    digest = sha256_file(archive)
    archive.with_name(archive.name + ".sha256").write_text(f"{digest}  {archive.name}\n")
    return archive


def verify_tree(root: Path) -> dict:
    """Check an extracted repository against its ``MANIFEST.json``: every listed file present, same sha256.

    Returns:
        The manifest.

    Raises:
        PackageError: Naming the first file that is missing or differs.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(f"{root}: no {MANIFEST_NAME} (not a packaged model repository)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    for rel, meta in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise PackageError(f"{rel}: listed in the manifest but missing")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise PackageError(f"{rel}: sha256 differs from the manifest (corrupted or modified)")
    return manifest


def extract_archive(archive: Path, dest: Path, *, expected_sha256: str | None = None) -> dict:
    """Verify an archive's sha256 (when given), extract it safely into ``dest`` and verify every file.

    Only regular files and directories inside ``dest`` are accepted (no links, devices, absolute paths or
    ``..``), so a crafted archive cannot write outside the model volume.

    Returns:
        The manifest.

    Raises:
        PackageError: On a checksum mismatch, an unsafe member, or a file that differs from the manifest.
    """
    archive, dest = Path(archive), Path(dest)
    if expected_sha256:
        actual = sha256_file(archive)
        if actual != expected_sha256.lower():
            raise PackageError(f"{archive.name}: sha256 {actual} != expected {expected_sha256.lower()}")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or os.path.isabs(member.name) or root not in target.parents:
                raise PackageError(f"{archive.name}: unsafe member {member.name!r} refused")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
    return verify_tree(dest)


def download(url: str, dest: Path, *, timeout_seconds: float = DOWNLOAD_TIMEOUT_SECONDS) -> Path:
    """Download ``url`` (http/https) to ``dest``, retrying transient failures a bounded number of times.

    Raises:
        PackageError: For another URL scheme, or when every attempt failed.
    """
    parsed = urllib.parse.urlparse(url)
    shown = parsed._replace(query="", fragment="").geturl()  # a presigned URL's query string is a credential
    if parsed.scheme not in ("http", "https"):
        raise PackageError(f"{shown!r}: only http(s) URLs are fetched (for S3 use a presigned or public object URL)")
    last: object = None
    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            with urllib.request.urlopen(url, timeout=timeout_seconds) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out, CHUNK_BYTES)
            return dest
        except OSError as error:  # URLError and socket errors; HTTP 4xx too: reported after the last attempt
            last = getattr(error, "reason", None) or type(error).__name__  # never the URL itself
            if attempt + 1 < DOWNLOAD_ATTEMPTS:
                time.sleep(min(2.0**attempt, 5.0))
    raise PackageError(f"download of {shown} failed after {DOWNLOAD_ATTEMPTS} attempts: {last}")


def _validate_config(text: str, source: str) -> None:
    try:
        from service.triton.model_config import ModelConfigError, parse_model_config, validate_model_config
    except ImportError:  # tritonclient missing: Triton itself still validates at load time
        return
    try:
        validate_model_config(parse_model_config(text, source=source), expected_name=Path(source).stem, source=source)
    except ModelConfigError as error:
        raise PackageError(str(error)) from None


def install(source: str, dest: Path, *, sha256: str | None = None, configs: Path | None = None) -> dict:
    """Put a packaged repository into ``dest`` (the pod's model volume), verified, with the target's configs.

    Args:
        source: An http(s) URL of the archive, a local ``.tar.gz`` file, or an extracted repository directory.
        dest: The (empty) directory Triton and the gateway read.
        sha256: The archive's expected sha256; required for a URL (a download is only trusted by its checksum).
        configs: A directory of ``<model>.pbtxt`` (the chart's ConfigMap); each one becomes that model's
            ``config.pbtxt``. Models without a config there are removed, so Triton serves exactly these.

    Returns:
        The manifest.

    Raises:
        PackageError: If anything cannot be fetched or does not verify; ``dest`` is then left empty.
    """
    dest = Path(dest)
    is_url = urllib.parse.urlparse(source).scheme in ("http", "https")
    if is_url and not sha256:
        raise PackageError("a URL source needs --sha256: a download is trusted only by its checksum")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():  # a restarted init container replaces what an earlier attempt left
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    # Download and extract inside the model volume itself (sized for models), not in a small /tmp; moving the
    # verified files into place is then a rename on the same filesystem.
    with tempfile.TemporaryDirectory(prefix=".install-", dir=dest) as tmp:
        staging = Path(tmp) / "repository"
        if is_url:
            archive = download(source, Path(tmp) / "models.tar.gz")
            manifest = extract_archive(archive, staging, expected_sha256=sha256)
        elif Path(source).is_file():
            manifest = extract_archive(Path(source), staging, expected_sha256=sha256)
        elif Path(source).is_dir():
            manifest = verify_tree(Path(source))
            shutil.copytree(source, staging)
        else:
            raise PackageError(f"{source}: neither an http(s) URL, an archive nor a directory")
        if configs is not None:
            wanted = {p.stem: p for p in sorted(Path(configs).glob("*.pbtxt"))}
            if not wanted:
                raise PackageError(f"{configs}: no <model>.pbtxt configs")
            missing = sorted(set(wanted) - set(manifest["models"]))
            if missing:
                raise PackageError(f"configs for {missing} but the artifact only has {sorted(manifest['models'])}")
            for model in manifest["models"]:
                if model not in wanted:
                    shutil.rmtree(staging / model)
            for model, path in wanted.items():
                text = path.read_text()
                _validate_config(text, f"{model}.pbtxt")
                (staging / model / CONFIG_FILE).write_text(text)
        for entry in staging.iterdir():  # the manifest last: its presence marks a complete installation
            if entry.name != MANIFEST_NAME:
                shutil.move(str(entry), str(dest / entry.name))
        shutil.move(str(staging / MANIFEST_NAME), str(dest / MANIFEST_NAME))
    return manifest


def add_package_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``package`` (shared by ``python -m service.modelprep package`` and this module)."""
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="the built repository")
    parser.add_argument("--output", type=Path, default=Path("artifacts/packages"), help="where the archive goes")
    parser.add_argument("--name", default="loraserve-models", help="artifact name")
    parser.add_argument("--version", required=True, help="artifact version, e.g. 2026.12.02-1")


def run_package(args: argparse.Namespace) -> int:
    """Run ``package`` from parsed arguments; print the archive path and its sha256."""
    archive = package_repository(args.repository, args.output, name=args.name, version=args.version)
    print(json.dumps({"archive": str(archive), "sha256": sha256_file(archive)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``package`` | ``verify`` | ``install`` a model-repository artifact."""
    parser = argparse.ArgumentParser(prog="python -m service.modelprep.package", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_package_arguments(sub.add_parser("package", help="archive a built repository with its manifest"))
    v = sub.add_parser("verify", help="check an archive (or extracted directory) against its manifest")
    v.add_argument("source", type=Path)
    v.add_argument("--sha256", help="expected sha256 of the archive")
    i = sub.add_parser("install", help="fetch, verify and extract into the model volume (the chart's init container)")
    i.add_argument("--source", required=True, help="http(s) URL, .tar.gz file or extracted directory")
    i.add_argument("--dest", type=Path, required=True)
    i.add_argument("--sha256", help="expected sha256 of the archive (required for a URL)")
    i.add_argument("--configs", type=Path, help="directory of <model>.pbtxt configs for this pod's target")
    args = parser.parse_args(argv)
    try:
        if args.command == "package":
            return run_package(args)
        if args.command == "verify":
            if args.source.is_dir():
                manifest = verify_tree(args.source)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    manifest = extract_archive(args.source, Path(tmp), expected_sha256=args.sha256)
        else:
            manifest = install(args.source, args.dest, sha256=args.sha256, configs=args.configs)
    except PackageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = {m: d["versions"] for m, d in manifest["models"].items()}
    print(json.dumps({"name": manifest["name"], "version": manifest["version"], "models": models}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
