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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train_util import TINY, losses, metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).absolute().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["local.sh", "multinode.sh", "hostfile.sh", "rank.sh", "env.sh", "common.sh", "slurm.sbatch"]
STEPS = 8
TIMEOUT_MIN = 0.5  # parallel.timeout_minutes for every run here (PRETRAIN_TIMEOUT_MINUTES)
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
ADDR = {"a": "10.213.0.1", "b": "10.213.0.2"}
IFNAME = "pteth0"  # the same name in both namespaces, as on a uniform cluster


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def last_step(run_dir: Path) -> int:
    return max((m["step"] for m in metrics(run_dir) if "train/loss" in m), default=0)


def launch_env(log_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PRETRAIN_", "MASTER_", "GLOO_", "NCCL_"))
           and k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "LOCAL_ADDR", "RANK", "WORLD_SIZE",
                         "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PRETRAIN_PYTHON=sys.executable,
               PRETRAIN_LOG_DIR=str(log_dir), PRETRAIN_TIMEOUT_MINUTES=str(TIMEOUT_MIN),
               PRETRAIN_RESTART_DELAY="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    """Run a launcher to the end; on a timeout, kill it with everything it started, then raise."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun puts its ranks in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check(proc, rc=0) -> str:
    out = proc.stdout if isinstance(proc.stdout, str) else ""
    assert proc.returncode == rc, f"exit {proc.returncode} (wanted {rc}):\n{out[-5000:]}"
    return out


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """TINY as a YAML file (the launchers take CONFIG [overrides]), STEPS steps."""
    cfg: dict = {}
    for item in [*TINY, f"train.max_steps={STEPS}"]:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        cfg.setdefault(section, {})[field] = yaml.safe_load(value)
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


# ----------------------------------------------------------------------------- SLURM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-host SLURM cluster (munged, slurmctld, slurmd) with its own config, ports and state."""
    need = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo"]
    missing = [b for b in need if not which(b)]
    if os.geteuid() != 0 or missing:
        pytest.skip("SLURM test needs root and " + (", ".join(missing) or "root") +
                    " (Debian packages slurmctld slurmd slurm-client munge; .ci/run installs them)")
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=pretraintest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.sock",
        "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "MpiDefault=none", "ReturnToService=2", "KillWait=10", "MinJobAge=600", "InactiveLimit=0",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": SBIN}
    pidfiles = [d / "slurmd.pid", d / "slurmctld.pid", d / "munged.pid"]
    try:
        subprocess.run([which("munged"), "-f", "-S", d / "munge.sock", f"--key-file={key}",
                        f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
                        f"--seed-file={d}/munged.seed"], check=True, env=env)
        subprocess.run([which("slurmctld"), "-c", "-i", "-f", conf], check=True, env=env)
        subprocess.run([which("slurmd"), "-f", conf], check=True, env=env)
        idle = lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env,  # noqa: E731
                                                capture_output=True, text=True).stdout
        wait_for(idle, 60, "the SLURM node to be idle", interval=0.5)
        yield d, env
    finally:
        subprocess.run(["scancel", "--full", "--partition=test"], env=env, capture_output=True)
        for pidfile in pidfiles:
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm, config, tmp_path):
    d, slurm_env = slurm
    # The uninterrupted run to compare with: the same config on one process.
    ref = run([sys.executable, "-m", "pretrain.train", "--config", config, f"train.out_dir={tmp_path / 'ref'}"],
              launch_env(tmp_path / "ref_logs"))
    check(ref)

    out = tmp_path / "slurm.out"
    env = {**launch_env(tmp_path / "logs", NPROC_PER_NODE=1, MASTER_PORT=free_port(),
                        PRETRAIN_FAULTS="sleep=0.5"), "SLURM_CONF": slurm_env["SLURM_CONF"]}
    env["PATH"] = SBIN
    sub = run(["sbatch", "--parsable", "--nodes=1", "--exclusive", f"--output={out}", LAUNCH / "slurm.sbatch",
               config, f"train.out_dir={tmp_path / 'run'}"], env, timeout=60)
    job = check(sub).strip().split(";")[0]
    sq = lambda fmt: subprocess.run(["squeue", "-h", "-j", job, "-o", fmt], env=env,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    wait_for(lambda: last_step(tmp_path / "run") >= 2, 240, "step 2 under SLURM")
    # What `--signal=USR1@120` does 120 s before the time limit: SIGUSR1 to the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    wait_for(lambda: sq("%T") == "PENDING" and "stop requested" in out.read_text(), 120,
             "the job to checkpoint and requeue itself", interval=0.5)
    # SLURM holds a requeued job for 120 s (BeginTime); an operator's release, after the
    # old credential's second has passed (a start in the same second is refused).
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    wait_for(lambda: sq("%T") == "", 300, "the requeued job to finish", interval=0.5)
    info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    log = out.read_text()
    assert "JobState=COMPLETED" in info and "Restarts=1" in info, info + log[-5000:]
    assert "launch: got SIGUSR1" in log
    assert re.search(r"stop requested \(SIGTERM/SIGUSR1\): saved \S+ at step [2-7];", log), log[-5000:]
    assert "requeueing job" in log and f"job {job} (restart 1)" in log
    assert "resumed from" in log and "slurm.sbatch: training finished" in log
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
