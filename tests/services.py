"""Real servers on loopback for tests: PostgreSQL (Debian's package, installed by .ci/run) and an
S3-protocol object store (moto's server). Each is started for the test and stopped by its PID."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return os.path.dirname(found[-1]) if found else None


@contextlib.contextmanager
def postgres_server(password: str | None = None):
    """A throwaway PostgreSQL cluster in a temp folder; yields a SQLAlchemy URL to an empty database.
    With ``password`` the server checks it (SCRAM) and the URL carries it, percent-encoded."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: install Debian's 'postgresql' package (.ci/run does)")
    data = tempfile.mkdtemp(prefix="prpg-", dir="/tmp")
    # PostgreSQL refuses to run as root; as root, run it as the package's 'postgres' user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()
    auth = ["-A", "trust"]
    if password is not None:
        pwfile = data + ".pw"  # beside the data folder: initdb wants that one empty
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        if as_user:
            shutil.chown(pwfile, "postgres")
        auth = ["-A", "scram-sha-256", f"--pwfile={pwfile}"]
    subprocess.run([*as_user, f"{bindir}/initdb", "-D", data, *auth, "-U", "pneumo"], check=True,
                   capture_output=True)
    server = subprocess.Popen([*as_user, f"{bindir}/postgres", "-D", data, "-p", str(port), "-k", data,
                               "-c", "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client_env = {**os.environ, "PGPASSWORD": password or ""}
        for _ in range(100):
            if subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run([f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "pneumo", "optuna"],
                       check=True, capture_output=True, env=client_env)
        userinfo = "pneumo" if password is None else f"pneumo:{urllib.parse.quote(password, safe='')}"
        yield f"postgresql://{userinfo}@127.0.0.1:{port}/optuna"
    finally:
        os.killpg(server.pid, 15)  # its own session: runuser and postgres, nothing else
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
        if password is not None:
            os.remove(data + ".pw")


@contextlib.contextmanager
def s3_server(monkeypatch, bucket: str):
    """moto's S3 server on loopback, with the AWS_* variables that pyarrow (and so Ray) read to use it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        server.stop()
