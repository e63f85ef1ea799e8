"""Replicas on other hosts, across a real network, on one machine: three network namespaces stand in
for three hosts, each joined to a bridge by a veth pair, with an address that exists only inside
the namespaces this test makes (10.213.X.0/24), and an sshd of its own with a host key and a client
key made for the test. `fastsd serve --hostfile` starts the replicas over ssh and its load balancer
reaches them over that network. Checked: an MII client gets images from every host; a host whose
network goes away is marked down and its requests go to the others; a host whose sshd goes away
(with everything on it) is marked down too; `fastsd stop` ends the remote replicas.

Needs root (`ip netns`), `ip`, `sshd`, `ssh` and `ssh-keygen` (`make test-slow` installs Debian's
openssh-server when root and it is missing); skips with the reason otherwise. Traffic goes only to
loopback and to the namespaces' addresses. Slow (minutes): three replicas start."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployment_cleanup import end_deployment
from fastsd.serving import ports, processes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
HOSTS = 3
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


def sh(*args, check=True, timeout=30):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {p.returncode}: {p.stderr.strip()}")
    return p


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns (run as root, as CI does)"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if SSHD is None:
        return "sshd is not installed (apt-get install openssh-server; `make test-slow` does it)"
    probe = f"fsdprobe{os.getpid()}"
    if sh("ip", "netns", "add", probe, check=False).returncode != 0:
        return "cannot create a network namespace here (ip netns add failed)"
    sh("ip", "netns", "del", probe, check=False)
    return None


class Hosts:
    """Namespaces h1..hN on a bridge, each with an sshd; removed by close()."""

    def __init__(self, tmp: Path):
        tag = os.getpid() % 100000
        self.net = f"10.213.{os.getpid() % 250}"
        self.bridge = f"fsdbr{tag}"
        self.tmp = tmp
        self.ns = [f"fsd{tag}h{k}" for k in range(1, HOSTS + 1)]
        self.addr = [f"{self.net}.{k + 1}" for k in range(1, HOSTS + 1)]
        self.veth = [f"fsv{tag}h{k}" for k in range(1, HOSTS + 1)]
        self.sshd: list[subprocess.Popen | None] = [None] * HOSTS
        self.made: list[tuple] = []

    def up(self):
        if self.net + "." in sh("ip", "-4", "addr").stdout:
            pytest.skip(f"{self.net}.0/24 is already in use on this machine")
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.made.append(("link", self.bridge))
        sh("ip", "addr", "add", f"{self.net}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for ns, addr, veth in zip(self.ns, self.addr, self.veth):
            sh("ip", "netns", "add", ns)
            self.made.append(("netns", ns))
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p")
            self.made.append(("link", veth))
            sh("ip", "link", "set", veth + "p", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", veth + "p")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", veth + "p", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # keys made for the test: the client's, and one host key shared by the sshds
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.tmp / "id"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.tmp / "host_key"))
        (self.tmp / "authorized_keys").write_text((self.tmp / "id.pub").read_text())
        host_pub = (self.tmp / "host_key.pub").read_text().split()[:2]
        (self.tmp / "known_hosts").write_text("".join(f"{a} {' '.join(host_pub)}\n" for a in self.addr))
        (self.tmp / "ssh_config").write_text(
            f"Host {self.net}.*\n  User root\n  IdentityFile {self.tmp / 'id'}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.tmp / 'known_hosts'}\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
        os.chmod(self.tmp / "id", 0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
        for k in range(HOSTS):
            self.start_sshd(k)
        for addr in self.addr:  # every host answers ssh with the test's key
            end = time.monotonic() + 20
            while sh("ssh", "-F", str(self.tmp / "ssh_config"), "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                     addr, "true", check=False).returncode != 0:
                assert time.monotonic() < end, f"ssh to {addr} does not work"
                time.sleep(0.5)

    def start_sshd(self, k):
        cfg = self.tmp / f"sshd_config_{k}"
        cfg.write_text(
            f"ListenAddress {self.addr[k]}\nPort 22\nHostKey {self.tmp / 'host_key'}\n"
            f"AuthorizedKeysFile {self.tmp / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PidFile {self.tmp / f'sshd_{k}.pid'}\nClientAliveInterval 2\nClientAliveCountMax 3\n")
        self.sshd[k] = subprocess.Popen(["ip", "netns", "exec", self.ns[k], SSHD, "-D", "-e", "-f", str(cfg)],
                                        stdout=subprocess.DEVNULL, stderr=open(self.tmp / f"sshd_{k}.log", "ab"))

    def pids(self, k) -> list[int]:
        out = sh("ip", "netns", "pids", self.ns[k], check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def replica_pids(self, k) -> list[int]:
        return [p for p in self.pids(k) if "fastsd.serving.replica" in processes.pid_cmdline(p)]

    def close(self):
        for k in range(HOSTS):
            for p in self.pids(k):  # only processes inside the namespaces this test made
                processes.signal_pid(p, signal.SIGKILL)
            if self.sshd[k] is not None:
                self.sshd[k].kill()
                self.sshd[k].wait(5)
        for kind, name in reversed(self.made):
            if kind == "netns":
                sh("ip", "netns", "del", name, check=False)
            else:
                sh("ip", "link", "del", name, check=False)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    h = Hosts(tmp_path_factory.mktemp("netns"))
    try:
        h.up()
        yield h
    finally:
        h.close()


def query(name, n, steps=2):
    import mii
    asyncio.set_event_loop(asyncio.new_event_loop())
    client = mii.legacy.mii_query_handle(name)
    return [client.query({"prompt": [f"a red circle {i}"], "negative_prompt": [""]}, num_inference_steps=steps,
                         seed=i) for i in range(n)]


def wait_until(check, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.25)
    return check()


def test_replicas_on_other_hosts(hosts, tmp_path, monkeypatch):
    from fastsd.serving.deploy import stop
    from fastsd.serving.status import status
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path / "mii"))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{a} slots=1\n" for a in hosts.addr))
    port = ports.free_port_block(HOSTS + 1)
    name = f"mh{os.getpid()}"
    ddir = tmp_path / "mii" / name
    serve = [sys.executable, "-m", "fastsd.cli", "serve", "--model", "fastsd-shapes", "--deployment", name,
             "--replicas", str(HOSTS), "--hostfile", str(hostfile), "--host", f"{hosts.net}.1", "--port", str(port),
             "--ssh-config", str(hosts.tmp / "ssh_config"), "--threads", "1", "--timeout", "120",
             "--startup-timeout", "900"]
    p = subprocess.run(serve, capture_output=True, text=True, timeout=1000,
                       env=dict(os.environ, OMP_NUM_THREADS="1", MII_CACHE_PATH=str(tmp_path / "mii")))
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        s = status(name)
        assert [r["host"] for r in s["replicas"]] == hosts.addr and [r["state"] for r in s["replicas"]] == ["up"] * 3
        for k in range(HOSTS):  # each replica runs inside its host's namespace, started through its sshd
            assert len(hosts.replica_pids(k)) == 1, (k, hosts.pids(k))

        # 1. an MII client gets images, from every host
        replies = query(name, 6)
        assert all(len(r.images) == 1 and r.images[0].size == (64, 64) for r in replies)
        assert wait_until(lambda: sum(status(name)["balancer"]["forwarded"]) == 6, 10)
        assert all(n >= 1 for n in status(name)["balancer"]["forwarded"])

        # 2. host 1's network goes away: marked down, its requests go to the others
        sh("ip", "netns", "exec", hosts.ns[0], "ip", "link", "set", hosts.veth[0] + "p", "down")
        assert wait_until(lambda: status(name)["balancer"]["up"] == [False, True, True], 20), status(name)["balancer"]
        before = status(name)["balancer"]["forwarded"]
        assert all(len(r.images) == 1 for r in query(name, 4))
        assert wait_until(lambda: sum(status(name)["balancer"]["forwarded"]) == sum(before) + 4, 10)
        after = status(name)
        assert after["balancer"]["forwarded"][0] == before[0] and after["replicas"][0]["state"] != "up"

        # 3. host 2's sshd goes away, with everything on that host: marked down too; host 3 answers
        for pid in hosts.pids(1):
            processes.signal_pid(pid, signal.SIGKILL)
        assert wait_until(lambda: status(name)["balancer"]["up"] == [False, False, True], 20)
        before = status(name)["balancer"]["forwarded"]
        assert all(len(r.images) == 1 for r in query(name, 3))
        assert wait_until(lambda: status(name)["balancer"]["forwarded"][2] == before[2] + 3, 10)
        # the supervisor keeps trying to start it again over ssh, which is refused: never up
        assert status(name)["replicas"][1]["state"] != "up"

        # 4. fastsd stop ends the remote replicas (host 1's through its sshd's keepalive: its network is down)
        remote = hosts.replica_pids(2)
        assert len(remote) == 1
        stop(name, quiet=True)
        assert wait_until(lambda: not hosts.replica_pids(2), 20), hosts.pids(2)
        assert not processes.pid_alive(remote[0])
        assert wait_until(lambda: not hosts.replica_pids(0), 30), hosts.pids(0)
        assert not any(hosts.replica_pids(k) for k in range(HOSTS))
    finally:
        end_deployment(name, ddir)
