"""A real one-node SLURM cluster for the tests: munged, MariaDB, slurmdbd, slurmctld and slurmd.

Everything lives in one private folder (configs from the templates beside this file, state, spool,
logs, pid files, the munge socket with a fresh key, the database) and on free ports. The one thing
outside it is a link /etc/slurm/slurm.conf -> <root>/etc/slurm.conf while the cluster runs, because
job steps only find the default path (see :meth:`SlurmCluster._link_system_conf`). Each daemon runs
in the foreground as a child of this process, in its own session; its PID goes to
``<root>/pids/<daemon>.pid`` and :meth:`SlurmCluster.stop` cancels the jobs, then ends exactly those
PIDs (and job processes of this cluster left behind), newest first, and removes the link.

By hand (root, Debian)::

    python tests/slurm/cluster.py start /tmp/mycluster   # prints: export SLURM_CONF=...
    python tests/slurm/cluster.py stop /tmp/mycluster
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent
# Binary -> the Debian package that provides it.
PACKAGES = {
    "munged": "munge", "munge": "munge", "unmunge": "munge",
    "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm",
    "sbatch": "slurm-client", "srun": "slurm-client", "sacct": "slurm-client", "sacctmgr": "slurm-client",
    "slurmdbd": "slurmdbd",
    "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server", "mariadb": "mariadb-server",
}
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # start order; stop is reversed
# Small InnoDB files: the default 96 MB redo log costs seconds of disk time at every start.
MARIADB_OPTIONS = ("--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M", "--skip-name-resolve")


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the daemons (not root, packages not installable): tests skip."""


class ClusterError(RuntimeError):
    """A daemon did not come up or go down; the message carries the tail of its log."""


def run(argv, timeout: float = 5.0, env=None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; a timeout reads as exit status 124, a missing binary as 127.

    The command gets its own session so that a timeout kills its children too (no pipe left open).
    """
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, 124, out, f"{err}\ntimed out after {timeout} s")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def which(binary: str) -> str | None:
    return shutil.which(binary, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def missing_packages() -> list[str]:
    return sorted({package for binary, package in PACKAGES.items() if which(binary) is None})


def ensure_packages(timeout: float = 600) -> list[str]:
    """Install the Debian packages of missing binaries (``apt-get update`` only if the install fails
    without it). Returns the packages installed; raises ClusterUnavailable when that is impossible."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("not root: cannot install packages or start the SLURM daemons")
    missing = missing_packages()
    if not missing:
        return []
    if which("apt-get") is None:
        raise ClusterUnavailable(f"no apt-get to install the missing packages {missing}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    result = run(install, timeout, env)
    if result.returncode != 0:
        run(["apt-get", "update"], timeout, env)
        result = run(install, timeout, env)
    if result.returncode != 0 or missing_packages():
        raise ClusterUnavailable(f"`{' '.join(install)}` failed: {tail(result.stdout + result.stderr)}")
    return missing


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports (all held open while choosing, so no two are the same)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:g} s")
        time.sleep(interval)


def _proc_text(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = _proc_text(pid, "stat")
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


def terminate(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL after ``timeout`` s; True when the process is gone."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not alive(pid):
                return True
            time.sleep(0.1)
    return not alive(pid)


class SlurmCluster:
    """A one-node SLURM cluster with accounting and one fake GPU, built from scratch in ``root``.

    The node claims ``cpus`` CPUs and ``memory_mb`` MB (config_overrides; nothing is enforced) so that
    the real profile's requests fit on a small test machine. :attr:`env` is the environment that
    points SLURM commands (and snakemake) at this cluster.
    """

    def __init__(self, root, cpus: int = 16, memory_mb: int = 65536):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]
        # Unique, so that job processes of this cluster can be told from another one's.
        name = f"diffdistill{zlib.crc32(str(self.root).encode()):08x}"
        ports = dict(zip(("ctld_port", "slurmd_port", "dbd_port", "db_port"), free_ports(4)))
        self.settings = {
            "root": self.root, "host": self.host, "cluster_name": name, "cpus": cpus, "memory_mb": memory_mb,
            "munge_socket": self.root / "munge" / "munge.sock", **ports,
            "db_user": "slurm", "db_password": secrets.token_hex(12),
        }
        self.start_seconds: float | None = None
        self._children: dict[str, subprocess.Popen] = {}  # daemons started by this object

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ without any SLURM job variables, plus SLURM_CONF of this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**env, "SLURM_CONF": str(self.conf)}

    def slurm(self, *argv, timeout: float = 5.0, input: str | None = None) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return run(list(argv), timeout, self.env, input)

    # --- start ----------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        """Start every daemon, wait until the node is idle and ``srun`` works. Stops what it started
        when any step fails."""
        started = time.monotonic()
        try:
            self._write_configs()
            self._start_munge()
            self._start_mariadb()
            self._start_slurm()
            result = self.slurm("srun", "-N1", "-n1", "-t", "1", "true", timeout=30)
            if result.returncode != 0:
                raise ClusterError(f"srun smoke test failed ({result.returncode}): {result.stderr.strip()}")
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        log.info("SLURM cluster %s up in %.1f s", self.root, self.start_seconds)
        return self

    def _write_configs(self) -> None:
        for folder in ("etc", "state/slurmctld", "state/slurmd", "run", "log", "pids", "munge/private", "db"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munge and mysql must reach their folders below it
        for name in ("slurm.conf", "slurmdbd.conf"):
            text = (TEMPLATES / name).read_text().format_map(self.settings)
            (self.root / "etc" / name).write_text(text)
        (self.root / "etc" / "slurmdbd.conf").chmod(0o600)  # slurmdbd refuses a readable password file
        self._link_system_conf()
        # File=/dev/null: a device file makes the GPU countable (Count=1 alone leaves the node INVAL).
        (self.root / "etc" / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File=/dev/null\n")

    def _link_system_conf(self) -> None:
        """Point /etc/slurm/slurm.conf at this cluster's file while it runs (undone by :meth:`stop`).

        The plugin's job step runs ``srun`` with every SLURM_* variable but a few job ids removed from
        its environment, SLURM_CONF included, so inside a job only the default path is found. A file
        that is not a link left by an earlier test cluster (now gone) is never replaced.
        """
        if SYSTEM_CONF.is_symlink() or SYSTEM_CONF.exists():
            target = Path(os.readlink(SYSTEM_CONF)) if SYSTEM_CONF.is_symlink() else None
            stale = target is not None and target.name == "slurm.conf" and not target.exists()
            if not stale:
                raise ClusterUnavailable(f"{SYSTEM_CONF} exists (a real cluster's, or another test cluster's); "
                                         "a test cluster needs that path and will not replace it")
            SYSTEM_CONF.unlink()
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)

    def _unlink_system_conf(self) -> None:
        if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf:
            SYSTEM_CONF.unlink()

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        """Start one daemon in the foreground, in its own session, and record its PID."""
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, cwd=self.root, user=user, group=user, start_new_session=True)
        self._children[name] = proc
        (self.root / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _wait_ready(self, name: str, check, timeout: float) -> None:
        """Wait for ``check()``; fail at once, with its log, if the daemon died meanwhile."""
        proc = self._children[name]

        def ready() -> bool:
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with status {proc.returncode} during start:\n{self._log_tail(name)}")
            return check()

        try:
            wait_until(ready, timeout, name)
        except TimeoutError as exc:
            raise ClusterError(f"{exc}\n{self._log_tail(name)}") from None

    def _log_tail(self, name: str) -> str:
        logs = [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"]
        return "\n".join(f"--- {p.name}\n{tail(p.read_text(errors='replace'))}" for p in logs if p.exists())

    def _start_munge(self) -> None:
        folder = self.root / "munge"
        key = folder / "private" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))  # a fresh key: this cluster trusts only itself
        key.chmod(0o600)
        user = pwd.getpwnam("munge")
        for path in (folder, folder / "private", key):
            os.chown(path, user.pw_uid, user.pw_gid)
        (folder / "private").chmod(0o700)
        folder.chmod(0o755)  # clients need to reach the socket
        private = folder / "private"
        self._spawn("munged", ["munged", "-F", f"--socket={self.settings['munge_socket']}", f"--key-file={key}",
                               f"--log-file={private / 'munged.log'}", f"--pid-file={private / 'munged.pid'}",
                               f"--seed-file={private / 'munged.seed'}"], user="munge")
        self._wait_ready("munged", self._munge_works, 15)

    def _munge_works(self) -> bool:
        sock = f"--socket={self.settings['munge_socket']}"
        cred = run(["munge", "-n", sock])
        return cred.returncode == 0 and run(["unmunge", sock], input=cred.stdout).returncode == 0

    def _start_mariadb(self) -> None:
        data = self.root / "db" / "data"
        shutil.chown(self.root / "db", "mysql", "mysql")
        init = run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", *MARIADB_OPTIONS, "--user=mysql",
                    "--auth-root-authentication-method=socket", "--skip-test-db"], timeout=120)
        if init.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed ({init.returncode}):\n{tail(init.stdout + init.stderr)}")
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={data}", *MARIADB_OPTIONS,
                                 f"--socket={self.root / 'db' / 'mysqld.sock'}", f"--port={self.settings['db_port']}",
                                 "--bind-address=127.0.0.1", "--user=mysql",
                                 f"--log-error={self.root / 'log' / 'mariadbd.log'}"])
        self._wait_ready("mariadbd", lambda: self._sql("SELECT 1").returncode == 0, 60)
        user = f"'{self.settings['db_user']}'@'127.0.0.1'"
        grant = self._sql(f"CREATE USER {user} IDENTIFIED BY '{self.settings['db_password']}'; "
                          f"GRANT ALL ON slurm_acct_db.* TO {user};")
        if grant.returncode != 0:
            raise ClusterError(f"creating the slurmdbd database user failed: {grant.stderr.strip()}")

    def _sql(self, statement: str) -> subprocess.CompletedProcess:
        return run(["mariadb", "--no-defaults", f"--socket={self.root / 'db' / 'mysqld.sock'}", "-u", "root",
                    "-e", statement], timeout=10)

    def _start_slurm(self) -> None:
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        # slurmctld dies ("no TRES") when it starts before slurmdbd answers.
        self._wait_ready("slurmdbd", lambda: self.slurm("sacctmgr", "-n", "list", "cluster").returncode == 0, 60)
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait_ready("slurmctld", lambda: self.slurm("scontrol", "ping").returncode == 0, 60)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_ready("slurmd", lambda: self.slurm("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", 60)

    # --- inspect --------------------------------------------------------------------------------

    def jobs(self) -> list[dict[str, str]]:
        """Every job the accounting database knows (allocations only, no steps), oldest first."""
        fields = ["JobID", "JobName", "Comment", "State", "ExitCode", "AllocTRES", "WorkDir"]
        result = self.slurm("sacct", "-X", "-n", "-P", "-a", "-S", "2000-01-01T00:00:00",
                            f"--format={','.join(fields)}", timeout=15)
        if result.returncode != 0:
            raise ClusterError(f"sacct failed ({result.returncode}): {result.stderr.strip()}")
        return [dict(zip(fields, line.split("|"))) for line in result.stdout.splitlines() if line.strip()]

    def cancel_all(self, timeout: float = 20.0) -> None:
        """Cancel every job of this cluster and wait until the queue is empty."""
        if not alive(self._pid("slurmctld")):
            return
        self.slurm("scancel", f"--user={pwd.getpwuid(os.geteuid()).pw_name}")
        try:
            wait_until(lambda: self.slurm("squeue", "-h").stdout.strip() == "", timeout, "empty queue", 0.5)
        except TimeoutError:
            log.warning("jobs still queued after scancel: %s", self.slurm("squeue", "-h").stdout)

    # --- stop -----------------------------------------------------------------------------------

    def _pid(self, name: str) -> int:
        """PID of a daemon this cluster started, or 0 (none, or the PID now belongs to another process)."""
        try:
            pid = int((self.root / "pids" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return 0
        cmdline = _proc_text(pid, "cmdline")
        ours = str(self.root) in cmdline or f"SLURM_CONF={self.conf}" in _proc_text(pid, "environ")
        return pid if ours else 0

    def _stray_pids(self, exclude: set[int]) -> list[int]:
        """slurmstepd and job processes of this cluster left behind (normally none after scancel)."""
        markers = (f"SLURM_CONF={self.conf} ", f"SLURM_CLUSTER_NAME={self.settings['cluster_name']} ")
        skip = exclude | {os.getpid(), os.getppid()}
        strays = []
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            environ = _proc_text(pid, "environ") + " "
            if pid in skip or not any(marker in environ for marker in markers) or not alive(pid):
                continue
            if "SLURM_JOB_ID=" in environ or "slurmstepd" in _proc_text(pid, "cmdline"):
                strays.append(pid)
        return strays

    def stop(self) -> list[str]:
        """Cancel jobs, end stray job processes, then every daemon by its PID, newest first, and remove
        the /etc/slurm/slurm.conf link. Returns what is still running (empty when all is gone)."""
        self.cancel_all()
        daemons = {name: self._pid(name) for name in DAEMONS}
        strays = self._stray_pids(set(daemons.values()))
        problems = [f"job process {pid}" for pid in strays if not terminate(pid)]
        for name in reversed(DAEMONS):
            if daemons[name] and not terminate(daemons[name]):
                problems.append(f"{name} (pid {daemons[name]})")
            (self.root / "pids" / f"{name}.pid").unlink(missing_ok=True)
        for proc in self._children.values():
            proc.poll()  # reap
        self._unlink_system_conf()
        if problems:
            log.error("could not stop: %s", ", ".join(problems))
        return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("root", type=Path, help="the cluster's folder (created by start)")
    parser.add_argument("--cpus", type=int, default=16)
    parser.add_argument("--memory-mb", type=int, default=65536)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster = SlurmCluster(args.root, args.cpus, args.memory_mb)
    if args.action == "stop":
        return 1 if cluster.stop() else 0
    ensure_packages()
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}  # up in {cluster.start_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
