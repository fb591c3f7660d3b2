"""A throwaway PostgreSQL server for the store and replica tests: a new cluster in a temporary
directory (initdb, then postgres under pg_ctl), trust authentication on a free loopback port, no
durability (fsync off: it is thrown away). The binaries are those on PATH, else Debian's
(/usr/lib/postgresql/VERSION/bin, from the `postgresql` package). initdb refuses to run as root,
so as root the cluster is made and run by the `postgres` user that Debian's package creates.

`PostgresServer.start()` raises `Unavailable` with the reason when no server can be started here.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.server.conftest import free_port

START_TIMEOUT_SECONDS = 60


class Unavailable(Exception):
    pass


def _bin_dir() -> Path | None:
    on_path = shutil.which("pg_ctl")
    if on_path is not None and shutil.which("initdb") is not None:
        return Path(on_path).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    return debian[-1].parent if debian else None



class PostgresServer:
    def __init__(self, bin_dir: Path, user: str | None):
        self._bin = bin_dir
        self._user = user  # run the server's programs as this user (None: as ourselves)
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="nanoserve-pg-"))
        self._data = self._dir / "data"
        if user is not None:
            os.chown(self._dir, pwd.getpwnam(user).pw_uid, -1)

    @classmethod
    def start(cls) -> "PostgresServer":
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install -e '.[test]')") from None
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise Unavailable("no PostgreSQL server binaries (pg_ctl, initdb) on PATH or in /usr/lib/postgresql; "
                              "on Debian: apt-get install postgresql")
        user = None
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres").pw_name
            except KeyError:
                raise Unavailable("running as root, which initdb refuses, and there is no 'postgres' user") from None
        server = cls(bin_dir, user)
        try:
            server._run("initdb", "--no-sync", "--auth=trust", "--username=postgres", "--encoding=UTF8",
                        "-D", str(server._data))
            options = (f"-p {server.port} -c listen_addresses=127.0.0.1 -k {server._dir} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            server._run("pg_ctl", "-D", str(server._data), "-l", str(server._dir / "log"), "-o", options,
                        "-w", "-t", str(START_TIMEOUT_SECONDS), "start")
        except (OSError, subprocess.SubprocessError) as err:
            log = server._dir / "log"
            detail = (getattr(err, "stderr", None) or b"").decode(errors="replace")
            detail += log.read_text(errors="replace")[-2000:] if log.exists() else ""
            server.stop()
            raise Unavailable(f"cannot start PostgreSQL from {bin_dir}: {err} {detail}".strip()) from None
        return server

    def _run(self, program: str, *args: str) -> None:
        subprocess.run([str(self._bin / program), *args], user=self._user, check=True, capture_output=True,
                       timeout=START_TIMEOUT_SECONDS, cwd=self._dir)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if (self._data / "postmaster.pid").exists():
            subprocess.run([str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "immediate", "stop"],
                           user=self._user, capture_output=True, timeout=START_TIMEOUT_SECONDS, cwd=self._dir)
        shutil.rmtree(self._dir, ignore_errors=True)
