"""The launchers in launch/, run for real: torchrun on one node, two "nodes" joined by a
network, the DeepSpeed launcher over ssh/pdsh, a node that dies, and SLURM preemption.

Each node is a network namespace; a veth pair joins the two (10.213.0.1 and 10.213.0.2,
private test addresses that exist only inside these namespaces). The nodes share the
file system, as cluster nodes share one for checkpoints. Runs share fixtures (one
training run serves several assertions). Needs root and `ip netns` (iproute2); the
ssh/pdsh and SLURM parts need openssh-server, pdsh and slurm-wlm (slurmctld, slurmd,
munge). Each part is skipped, with the reason, where that is missing; .ci/run installs them.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_util import (LAUNCH, ROOT, STEPS, TIMEOUT_MIN, check, kill_tree, last_step, launch_env, run, wait_for,
                         which)
from train_util import losses

pytestmark = pytest.mark.slow

SCRIPTS = ["local.sh", "multinode.sh", "hostfile.sh", "rank.sh", "env.sh", "common.sh", "slurm.sbatch"]
ADDR = {"a": "10.213.0.1", "b": "10.213.0.2"}
IFNAME = "pteth0"  # the same name in both namespaces, as on a uniform cluster


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax_and_help(name):
    script = LAUNCH / name
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if name not in ("env.sh", "common.sh", "slurm.sbatch"):
        assert os.access(script, os.X_OK), f"{script} is not executable"
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"launch/{name}" in out.stdout and len(out.stdout.splitlines()) >= 3
    assert "#" not in out.stdout.splitlines()[0]


def test_shellcheck():
    if not which("shellcheck"):
        pytest.skip("shellcheck not installed (Debian package shellcheck; .ci/run installs it)")
    # From the repository root: the `# shellcheck source=launch/...` directives are relative to it.
    out = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_readme_documents_every_script():
    readme = (LAUNCH / "README.md").read_text()
    for name in [*SCRIPTS, "pretrain.launch.autoresume"]:
        assert name in readme, name


def test_user_errors_exit_2_with_one_line(tmp_path, config):
    env = launch_env(tmp_path / "logs")
    bad_hosts = tmp_path / "hosts"
    bad_hosts.write_text("# comment\nnode-a slots=2\nnode-b two slots\n")
    cases = [
        ([LAUNCH / "local.sh"], "missing CONFIG"),
        ([LAUNCH / "local.sh", tmp_path / "nope.yaml"], "not found"),
        ([LAUNCH / "multinode.sh", config], "MASTER_ADDR"),
        ([LAUNCH / "hostfile.sh", bad_hosts, config], "line 3"),
        ([LAUNCH / "hostfile.sh", tmp_path / "none", config], "not found"),
        (["bash", LAUNCH / "slurm.sbatch", config], "not inside a SLURM job"),
    ]
    for cmd, message in cases:
        proc = run(cmd, env, timeout=30)
        assert proc.returncode == 2, (cmd, proc.stdout)
        assert proc.stdout.startswith("error: ") and message in proc.stdout, (cmd, proc.stdout)
        assert proc.stdout.count("\n") == 1, (cmd, proc.stdout)


# ----------------------------------------------------------------------------- one node
@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """launch/local.sh with 4 CPU processes: the losses every multi-node run must reproduce."""
    d = tmp_path_factory.mktemp("local4")
    proc = run([LAUNCH / "local.sh", config, f"train.out_dir={d / 'run'}"],
               launch_env(d / "logs", NPROC_PER_NODE=4))
    return d, proc


def test_local_sh_trains_on_4_processes_with_per_rank_logs(reference):
    d, proc = reference
    console = check(proc)
    assert "on 4 cpu process(es)" in console and f"done: step {STEPS}" in console
    assert sorted(losses(d / "run")) == list(range(1, STEPS + 1))
    logs = sorted(p.name for p in (d / "logs").glob("rank_*.log"))
    assert logs == [f"rank_{r:05d}.log" for r in range(4)]
    assert f"step {STEPS}/{STEPS}" in (d / "logs" / "rank_00000.log").read_text()  # rank 0: file ...
    assert "rank 3 (local 3)" in (d / "logs" / "rank_00003.log").read_text()
    assert "rank 3 (local 3)" not in console  # ... and console; the others only in their files


def torchrun_stand_in(tmp_path, rank_script: str, wait=True, nproc=2):
    """pretrain_run (what local.sh and multinode.sh run) around torchrun with stand-in ranks."""
    script = (f'. launch/common.sh && . launch/env.sh && PRETRAIN_NPROC={nproc} && pretrain_run '
              f'"$PRETRAIN_PYTHON" -m torch.distributed.run --standalone --nproc_per_node={nproc} '
              '--no-python launch/rank.sh bash -c "$RANK_SCRIPT"')
    env = launch_env(tmp_path / "logs", RANK_SCRIPT=rank_script)
    if not wait:
        return subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return run(["bash", "-c", script], env, timeout=120)


def test_node_exit_status_is_the_trainers_own(tmp_path):
    # torchrun exits 1 whatever its ranks did; the launchers report a rank's 2 (configuration
    # error), which the auto-resume wrapper must not retry.
    proc = torchrun_stand_in(tmp_path, 'if [ "$RANK" = 1 ]; then exit 2; fi; exec sleep 60')
    check(proc, rc=2)


@pytest.mark.parametrize("launcher,ranks,node", [
    (1, "2 143", 2), (1, "3 143", 3), (1, "3 2", 2), (1, "1 143", 1), (1, "", 1), (0, "0 0", 0),
    (137, "", 137), (1, "0 0", 0), (1, "0", 1), (1, "0 143", 1)])
def test_node_status_rule(tmp_path, launcher, ranks, node):
    status = tmp_path / "status"
    status.mkdir()
    for rank, code in enumerate(ranks.split()):
        (status / f"rank_{rank}").write_text(code + "\n")
    out = subprocess.run(["bash", "-c", f'. launch/common.sh && PRETRAIN_STATUS_DIR={status} PRETRAIN_NPROC=2 '
                          f'pretrain_node_status {launcher}'], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == str(node), out


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_stop_signal_reaches_every_rank_and_the_node_exits_0(tmp_path, sig):
    # SIGUSR1 goes straight to the ranks (torchrun ignores it); SIGTERM through torchrun, which
    # exits 1 after passing it on, but the ranks' clean exits make the node's status 0. Like the
    # trainer, the stand-in rank installs handlers (until then, under torchrun, SIGUSR1 is
    # ignored: an early one is lost rather than fatal).
    ready = tmp_path / "ready"
    rank = (f'exec "$PRETRAIN_PYTHON" -c "import os, signal, sys, time; '
            "stop = lambda *a: (print('rank', os.environ['RANK'], 'checkpointed', flush=True), sys.exit(0)); "
            "signal.signal(signal.SIGUSR1, stop); signal.signal(signal.SIGTERM, stop); "
            f"open('{ready}.' + os.environ['RANK'], 'w').close(); "
            '[time.sleep(0.1) for _ in iter(int, 1)]"')
    proc = torchrun_stand_in(tmp_path, rank, wait=False)
    try:
        wait_for(lambda: all(Path(f"{ready}.{r}").exists() for r in range(2)), 60, "the stand-in ranks")
        proc.send_signal(getattr(signal, sig))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # only while not reaped: a reaped pid may belong to someone else
            kill_tree(proc.pid)
    assert proc.returncode == 0, out
    assert f"launch: got {sig}" in out
    assert "rank 0 checkpointed" in out  # rank 0: console and its file; rank 1: only its file
    assert "rank 1 checkpointed" not in out
    assert "rank 1 checkpointed" in (tmp_path / "logs" / "rank_00001.log").read_text()


# ----------------------------------------------------------------------------- two nodes
class Netns:
    """Two network namespaces ("nodes") a and b joined by a veth pair."""

    def __init__(self):
        tag = f"pt{os.getpid() % 100000}"
        self.ns = {"a": f"{tag}a", "b": f"{tag}b"}
        self.procs: list[subprocess.Popen] = []

    def ip(self, *args, check=True):
        return subprocess.run([which("ip"), *args], check=check, capture_output=True, text=True)

    def setup(self):
        a, b = self.ns["a"], self.ns["b"]
        self.ip("netns", "add", a)
        self.ip("netns", "add", b)
        self.ip("link", "add", f"{a}v", "type", "veth", "peer", "name", f"{b}v")
        for node, ns in self.ns.items():
            self.ip("link", "set", f"{ns}v", "netns", ns)
            self.ip("-n", ns, "link", "set", f"{ns}v", "name", IFNAME)
            self.ip("-n", ns, "addr", "add", f"{ADDR[node]}/24", "dev", IFNAME)
            self.ip("-n", ns, "link", "set", IFNAME, "up")
            self.ip("-n", ns, "link", "set", "lo", "up")

    def teardown(self):
        for ns in self.ns.values():
            self.kill_all(ns)
            self.ip("netns", "del", ns, check=False)

    def pids(self, ns) -> list[int]:
        out = self.ip("netns", "pids", ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, ns) -> None:
        for pid in self.pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def start(self, node: str, cmd, env: dict, log: Path) -> subprocess.Popen:
        with open(log, "a") as f:
            proc = subprocess.Popen([which("ip"), "netns", "exec", self.ns[node], *map(str, cmd)], env=env, cwd=ROOT,
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def link(self, node: str, up: bool) -> None:
        self.ip("-n", self.ns[node], "link", "set", IFNAME, "up" if up else "down")


@pytest.fixture(scope="module")
def netns():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if not which("ip"):
        pytest.skip("`ip` not found (Debian package iproute2; .ci/run installs it)")
    net = Netns()
    try:
        net.setup()
    except subprocess.CalledProcessError as e:
        net.teardown()
        pytest.skip(f"cannot create network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    try:
        yield net
    finally:
        net.teardown()


def node_env(log_dir: Path, node_rank: int, **extra) -> dict:
    return launch_env(log_dir, MASTER_ADDR=ADDR["a"], MASTER_PORT=29500, NNODES=2, NODE_RANK=node_rank,
                      NPROC_PER_NODE=2, PRETRAIN_IFNAME=IFNAME, **extra)


@pytest.fixture(scope="module")
def node_death(netns, config, tmp_path_factory):
    """2 nodes x 2 processes through launch/multinode.sh, each node under the auto-resume
    wrapper; node b vanishes mid-run (link down, every process killed: no FIN, no RST, like a
    power loss); a replacement node b starts the same command; both finish."""
    d = tmp_path_factory.mktemp("node_death")
    autoresume = [sys.executable, "-m", "pretrain.launch.autoresume", "--max-restarts", "2", "--"]
    cmd = [*autoresume, LAUNCH / "multinode.sh", config, f"train.out_dir={d / 'run'}"]
    slow = {"PRETRAIN_FAULTS": "sleep=0.5"}  # room to kill node b mid-run
    logs = d / "logs"
    res = {"dir": d}
    netns.start("b", cmd, node_env(logs, 1, **slow), d / "b.out")  # any start order works
    a = netns.start("a", cmd, node_env(logs, 0, **slow), d / "a.out")
    wait_for(lambda: last_step(d / "run") >= 4, 240, "step 4 of the first attempt")
    res["losses_before_kill"] = losses(d / "run")

    netns.link("b", up=False)
    netns.kill_all(netns.ns["b"])
    killed_at = time.monotonic()
    failed = re.compile(r"autoresume: exit (\d+): restarting")
    m = wait_for(lambda: failed.search((d / "a.out").read_text()), 60 * TIMEOUT_MIN + 120,
                 "node a to fail after node b died (a hang: does every process group, DeepSpeed's "
                 "too, get parallel.timeout_minutes? torch gives new groups 30 min by default)")
    res["a_failed_after"] = time.monotonic() - killed_at
    res["a_first_exit"] = int(m.group(1))
    print(f"node a exited {res['a_first_exit']} {res['a_failed_after']:.1f}s after node b died "
          f"(timeout {60 * TIMEOUT_MIN:g}s)")

    # The replacement node b; node a's wrapper has restarted and waits at the rendezvous.
    netns.link("b", up=True)
    b2 = netns.start("b", cmd, node_env(logs, 1, **slow), d / "b2.out")
    res["rc"] = {"a": a.wait(timeout=300), "b2": b2.wait(timeout=60)}
    res["out"] = {n: (d / f"{n}.out").read_text() for n in ("a", "b", "b2")}
    return res


def test_two_nodes_train_like_one_node(node_death, reference):
    r = node_death
    assert r["rc"] == {"a": 0, "b2": 0}, r["out"]["a"][-3000:] + r["out"]["b2"][-3000:]
    out = r["out"]["a"] + r["out"]["b"]
    assert "node 0 of 2, 2 process(es)" in out and "node 1 of 2, 2 process(es)" in out
    assert "on 4 cpu process(es)" in out and f"this node {ADDR['b']}" in r["out"]["b"]
    assert sorted(p.name for p in (r["dir"] / "logs").glob("rank_*.log")) == [f"rank_{i:05d}.log" for i in range(4)]
    ref = losses(reference[0] / "run")
    # Steps before the kill come from the first attempt: an uninterrupted 2 x 2 run.
    assert len(r["losses_before_kill"]) >= 4
    assert r["losses_before_kill"] == {s: ref[s] for s in r["losses_before_kill"]}


def test_dead_node_fails_the_survivor_within_the_timeout(node_death):
    r = node_death
    assert r["a_first_exit"] != 0
    # The hung collective fails after parallel.timeout_minutes, then the ranks and torchrun exit.
    assert r["a_failed_after"] < 60 * TIMEOUT_MIN + 30, (
        f"node a took {r['a_failed_after']:.0f}s to fail (timeout {60 * TIMEOUT_MIN:g}s)")


def test_autoresume_resumes_both_nodes_to_the_same_losses(node_death, reference):
    r = node_death
    assert r["rc"] == {"a": 0, "b2": 0}
    assert re.search(r"resumed from \S+step_0000000[36] at step [36]", r["out"]["a"]), r["out"]["a"][-3000:]
    assert "autoresume: finished (attempt 2" in r["out"]["a"]
    assert "autoresume: finished (attempt 1" in r["out"]["b2"]  # the replacement node
    assert losses(r["dir"] / "run") == losses(reference[0] / "run")


# ----------------------------------------------------------------------------- DeepSpeed launcher
@pytest.fixture
def sshd(netns, tmp_path):
    """sshd in both namespaces (root, key only) and an `ssh` on PATH that uses the test key."""
    missing = [b for b in ("sshd", "ssh", "ssh-keygen", "pdsh") if not which(b)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages openssh-server, openssh-client, "
                    "pdsh; .ci/run installs them)")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("key", "hostkey"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key], check=True)
    shutil.copy(d / "key.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    daemons = []
    for node, addr in ADDR.items():
        conf = d / f"sshd_{node}.conf"
        conf.write_text(f"ListenAddress {addr}\nPort 22\nHostKey {d / 'hostkey'}\nPidFile {d}/sshd_{node}.pid\n"
                        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
                        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                        "KbdInteractiveAuthentication no\nX11Forwarding no\nPrintMotd no\n")
        with open(d / f"sshd_{node}.log", "w") as log:
            daemons.append(subprocess.Popen([which("ip"), "netns", "exec", netns.ns[node], which("sshd"), "-D",
                                             "-e", "-f", conf], stdout=subprocess.DEVNULL, stderr=log))
    (d / "config").write_text(f"Host *\n  IdentityFile {d / 'key'}\n  IdentitiesOnly yes\n  BatchMode yes\n"
                              "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    bindir = d / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec {which("ssh")} -F {d / "config"} "$@"\n')
    (bindir / "ssh").chmod(0o755)
    try:
        def reachable():
            probe = subprocess.run([which("ip"), "netns", "exec", netns.ns["a"], bindir / "ssh", ADDR["b"], "true"],
                                   capture_output=True)
            return probe.returncode == 0
        wait_for(reachable, 30, "sshd in the namespaces", interval=0.3)
        yield bindir
    finally:
        for p in daemons:
            p.terminate()
            p.wait(10)


def test_hostfile_runs_deepspeed_over_pdsh_ssh_and_matches(netns, sshd, config, reference, tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text(f"# two nodes\n{ADDR['a']} slots=2\n\n{ADDR['b']} slots=2  # node 1\n")
    env = launch_env(tmp_path / "logs", PRETRAIN_IFNAME=IFNAME, MASTER_PORT=29600,
                     PATH=f"{sshd}{os.pathsep}{os.environ['PATH']}")
    proc = netns.start("a", [LAUNCH / "hostfile.sh", hosts, config, f"train.out_dir={tmp_path / 'run'}"], env,
                       tmp_path / "out")
    rc = proc.wait(timeout=300)
    out = (tmp_path / "out").read_text()
    assert rc == 0, out[-5000:]
    assert "pdsh" in out and f"{ADDR['b']}: " in out  # launched on node b through pdsh/ssh
    env_file = (tmp_path / "logs" / "deepspeed_env").read_text()
    assert f"GLOO_SOCKET_IFNAME={IFNAME}" in env_file and f"PRETRAIN_TIMEOUT_MINUTES={TIMEOUT_MIN}" in env_file
    assert sorted(p.name for p in (tmp_path / "logs").glob("rank_*.log")) == [f"rank_{r:05d}.log" for r in range(4)]
    assert losses(tmp_path / "run") == losses(reference[0] / "run")
