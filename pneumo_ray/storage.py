"""Where an experiment lives: a local or shared folder, or a cloud URI (``s3://``, ``gs://``).

Ray writes trial results and checkpoints to either through pyarrow's filesystems; the few files
pneumo-ray reads and writes itself go through the same layer. Code that needs real files (the
leaderboard loads checkpoints, reads Tune's state) works on a local *mirror* of a cloud experiment
and publishes what it wrote back to the bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pneumo_ray.layout import TUNE_STATE_GLOB


def _saved_state(exp_dir: Path) -> list[tuple[dict, dict]]:
    states = sorted(Path(exp_dir).glob(TUNE_STATE_GLOB))  # by name, the session's start; not by mtime, since
    if not states:                                       # Tune re-syncs old files too
        return []
    return [(json.loads(trial), json.loads(run)) for trial, run in json.loads(states[-1].read_text())["trial_data"]]


def saved_trials(exp_dir: Path) -> list[dict]:
    """Tune's newest saved experiment state: one dict per trial (trial_id, status, relative_logdir...)."""
    return [trial for trial, _ in _saved_state(exp_dir)]


def last_results(exp_dir: Path) -> dict[str, dict]:
    """Trial id -> what it reported last (its last epoch's metrics), as Tune saved it."""
    return {trial["trial_id"]: run.get("last_result") or {} for trial, run in _saved_state(exp_dir)}


def is_remote(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def experiment_uri(storage: str, name: str) -> str:
    if is_remote(storage):
        return storage.rstrip("/") + "/" + name
    return str(Path(storage.removeprefix("file://")).expanduser().resolve() / name)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _fs(uri: str):
    import pyarrow.fs

    if not is_remote(uri):
        return pyarrow.fs.LocalFileSystem(), uri
    return pyarrow.fs.FileSystem.from_uri(uri)


def check_reachable(uri: str) -> None:
    """Open the filesystem and list the path once; raises with pyarrow's reason if that cannot work."""
    import pyarrow.fs

    fs, path = _fs(uri)
    fs.get_file_info(pyarrow.fs.FileSelector(path.rsplit("/", 1)[0], allow_not_found=True))


def exists(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def has_files(uri: str) -> bool:
    import pyarrow.fs

    fs, path = _fs(uri)
    return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))


def free_bytes(uri: str) -> int | None:
    """Free space where a local experiment folder is (or will be); None for a bucket."""
    if is_remote(uri):
        return None
    path = Path(uri.removeprefix("file://"))
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def mirror(uri: str) -> Path:
    """A local folder holding the experiment's files: the folder itself when it is local, else a
    download of the cloud experiment into a cache folder named after the URI."""
    import pyarrow.fs

    if not is_remote(uri):
        return Path(uri)
    cache_root = Path(os.environ.get("PNEUMO_RAY_CACHE", Path(tempfile.gettempdir()) / "pneumo-ray-cache"))
    local = cache_root / (uri.rstrip("/").rsplit("/", 1)[-1] + "-" + hashlib.sha1(uri.encode()).hexdigest()[:8])
    shutil.rmtree(local, ignore_errors=True)  # a fresh copy: Ray deletes checkpoints it no longer keeps
    local.mkdir(parents=True)
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local


def publish(local_dir: Path, uri: str, names: list[str]) -> None:
    """Upload files/folders that were written into a mirror back to the cloud experiment."""
    import pyarrow.fs

    if not is_remote(uri):
        return
    fs, path = _fs(uri)
    local_fs = pyarrow.fs.LocalFileSystem()
    for name in names:
        source = local_dir / name
        if source.exists():
            pyarrow.fs.copy_files(str(source), f"{path}/{name}", source_filesystem=local_fs, destination_filesystem=fs)


def absolute_path(path: str, base: Path) -> str:
    """``path`` as an absolute local path: ``~`` expanded, a relative path taken from ``base``."""
    return str((base / Path(path).expanduser()).resolve())


def absolute_sqlite_url(url: str, base: Path) -> str:
    """A SQLite URL's file made absolute (``sqlite:///optuna.db`` -> ``sqlite:////abs/optuna.db``); any
    other database URL is left as it is."""
    from sqlalchemy.engine import make_url  # Optuna's own dependency

    try:
        parsed = make_url(url)
    except Exception:  # not a URL at all: validation says so with the field's name
        return url
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or parsed.database.startswith("file:"):
        return url
    return parsed.set(database=absolute_path(parsed.database, base)).render_as_string(hide_password=False)


def absolute_mlflow_uri(uri: str | None, base: Path) -> str | None:
    """An MLflow store on this machine made absolute: a SQLite file's path, or a folder as a file: URI. A server's
    URL stays as it is."""
    if not uri or uri.startswith(("http://", "https://", "databricks")):
        return uri
    return absolute_sqlite_url(uri, base) if "://" in uri else Path(absolute_path(uri, base)).as_uri()
