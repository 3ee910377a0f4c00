"""Slurm on a real cluster of two nodes on this machine (slurm/local-cluster/up.sh --nodes 2: Debian's slurm-wlm
and munge, as root; each node a slurmd in a network and UTS namespace of its own): `pretrain submit` and
slurm/train.sbatch train to completion; a warning signal, a preemption (`scontrol requeue`) and `pretrain cancel`
are survived or obeyed with bit-exact resume; a failure that comes back at the same step stops requeuing; hostile
job names and run paths neither break nor inject into the batch script. Across the two nodes, one task each: the
loss of one node with two tasks to the last bit, each rank on its own node; a preemption, then a rank killed on
the second node (restarted inside the job, without a requeue), resumed exactly from the newest complete checkpoint.

Every job is the tiny model with 2 tasks (gloo on CPU), 24 steps: one node with two tasks, or two nodes with one.
Jobs run one after the other: each takes both cores of this machine (the nodes share them); 13 job starts dominate
the module's time (9 minutes on 2 cores under a load of 5 to 15 from other work). Slurm holds a requeued job for
two minutes (its BeginTime); `wait_for_end` releases it to start 5 s later with `scontrol update starttime=now+5`,
as an impatient user would (not at once: a start in the second of the requeue finds the node still revoking the
previous run's credential, and Slurm fails the job); the cluster's scheduler starts it within 2 s of that time.

Without root or apt-get (and Slurm not installed) the tests skip; with PRETRAIN_REQUIRE_SLURM=1 (set by .ci/run)
or CI=true they fail instead.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.errors import UserError
from launch.restarts import read_restarts
from launch.slurm import job_state
from pretrain.checkpoint.store import complete_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
COMMON = [
    f"train.steps={STEPS}", "train.global_batch=8", "parallel.micro_batch=2", "logging.every_steps=1",
    "checkpoint.every_steps=0", "train.eval_every=0", "data.num_workers=0", "logging.tensorboard=false",
]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Shell and #SBATCH metacharacters; each command writes a file named PWNED* in the job's working directory.
HOSTILE = "it's \"q\" $(touch PWNED1); `touch PWNED2` ; touch PWNED3 & echo $HOME #"


def cluster_processes(state: Path) -> list[int]:
    """The local cluster's daemons (from their pid files) and every process in its nodes' namespaces."""
    pids = [int(f.read_text()) for f in state.glob("*.pid") if f.read_text().strip()]
    names = (state / "netns").read_text().split() if (state / "netns").is_file() else []
    for name in names:
        listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
        pids += [int(pid) for pid in listed.split()]
    return pids


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A Slurm cluster of two nodes (network namespaces of this machine) for the session; every test but the
    two-node ones runs its job on one of them. Afterwards down.sh must leave none of its processes, namespaces or
    links behind."""
    required = os.environ.get("PRETRAIN_REQUIRE_SLURM") == "1" or os.environ.get("CI") == "true"

    def unavailable(reason: str):
        if required:
            pytest.fail(f"{reason}, and PRETRAIN_REQUIRE_SLURM=1 (or CI=true) says the Slurm tests must run here")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("the local Slurm cluster needs root (slurmd, munged); run as root or in CI")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        unavailable("Slurm is not installed and there is no apt-get to install slurm-wlm")
    state = tmp_path_factory.mktemp("slurm-cluster")
    saved = os.environ.get("SLURM_CONF")
    try:
        up = subprocess.run(["bash", str(ROOT / "slurm/local-cluster/up.sh"), "--nodes", "2", str(state)],
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"slurm/local-cluster/up.sh failed:\n{up.stdout}\n{up.stderr[-3000:]}"
        os.environ["SLURM_CONF"] = str(state / "slurm.conf")
        yield state
    finally:
        processes = cluster_processes(state)
        subprocess.run(["bash", str(ROOT / "slurm/local-cluster/down.sh"), str(state)], timeout=120)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
    assert [pid for pid in processes if running(pid)] == []
    assert "pretrain-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pretrain-" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def submit(run_dir: Path, data: list[str], *extra: str, job_name: str = "pretrain-test") -> str:
    result = run_cli("submit", "configs/tiny.yaml", *data, *COMMON, *extra, "--run-dir", str(run_dir),
                     "--job-name", job_name, "--time", "10")
    return result.stdout.split()[0]


def job(job_id: str) -> dict:
    """job_state, tolerating the odd request that a slurmctld busy on 2 loaded cores drops."""
    for _ in range(10):
        try:
            return job_state(job_id)
        except UserError:
            time.sleep(1)
    return job_state(job_id)


def slurm(*command: str) -> subprocess.CompletedProcess:
    """A Slurm client command, tried again when the controller drops it."""
    for _ in range(10):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0 or "Invalid job id" in result.stderr:
            return result
        time.sleep(1)
    raise AssertionError(f"{shlex.join(command)} failed 10 times: {result.stderr}")


_released: set[tuple[str, str]] = set()


def release(job_id: str, restarts: str) -> None:
    """Let a requeued job start in 5 s instead of after its BeginTime, once per requeue (each update would push the
    start back again); may race with its start: then a no-op."""
    if (job_id, restarts) not in _released:
        _released.add((job_id, restarts))
        subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now+5"], capture_output=True)


def queued(job_id: str) -> bool:
    """Whether the job is still pending, running or completing (squeue lists it)."""
    return bool(slurm("squeue", "-h", "-j", job_id).stdout.strip())


def wait_for_end(job_id: str, timeout: float = 480) -> dict:
    """Poll the job until it has ended, releasing it whenever a requeue left it waiting for its BeginTime."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job(job_id)
        if state["JobState"] == "PENDING" and state["Reason"] == "BeginTime":
            release(job_id, state["Restarts"])
        if state["JobState"] in TERMINAL and not queued(job_id):
            return state
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not end in {timeout:.0f} s: {job(job_id)}")


def wait_for_step(run_dir: Path, job_id: str, step: int, restarts: int = 0, timeout: float = 300) -> None:
    """Wait until the job's run `restarts` has logged training step `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job(job_id)
        if state["JobState"] in TERMINAL:
            raise AssertionError(f"job {job_id} ended early: {state}\n{job_log(run_dir, job_id)[-4000:]}")
        if state["JobState"] == "PENDING" and state["Reason"] == "BeginTime":
            release(job_id, state["Restarts"])
        if int(state["Restarts"]) == restarts and state["JobState"] == "RUNNING" and step in losses(run_dir):
            return
        time.sleep(0.1)
    log = job_log(run_dir, job_id)
    raise AssertionError(f"job {job_id} did not reach step {step} in {timeout:.0f} s\n{log[-4000:]}")


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def job_log(run_dir: Path, job_id: str) -> str:
    logs = sorted((run_dir / "slurm").glob(f"{job_id}_*_log.*"))
    return "\n".join(p.read_text(errors="replace") for p in logs)


def requeues(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "requeues.json"
    return json.loads(path.read_text()) if path.is_file() else []


def hostile_leftovers() -> list[Path]:
    return sorted(ROOT.glob("PWNED*"))


@pytest.fixture(scope="module")
def reference(slurm_cluster, tiny_data, tmp_path_factory):
    """An uninterrupted `pretrain submit` job with a hostile job name and run path."""
    run_dir = tmp_path_factory.mktemp("slurm") / f"run {HOSTILE}"
    job_id = submit(run_dir, tiny_data, job_name=HOSTILE)
    state = wait_for_end(job_id)
    return {"job": job_id, "state": state, "run_dir": run_dir, "losses": losses(run_dir)}


def test_submit_trains_to_completion_and_status_shows_job_and_run(reference):
    job_id, run_dir = reference["job"], reference["run_dir"]
    assert reference["state"]["JobState"] == "COMPLETED", job_log(run_dir, job_id)
    assert reference["state"]["Restarts"] == "0"
    assert reference["state"]["JobName"] == HOSTILE  # quoted into #SBATCH, read back by Slurm unchanged
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert reference["losses"][STEPS] < reference["losses"][1] - 1.0
    assert hostile_leftovers() == [], "a command hidden in the job name or run path ran"

    shown = run_cli("status", job_id).stdout
    assert f"job {job_id} ({HOSTILE}): COMPLETED" in shown
    assert f"run {run_dir}: step {STEPS}/{STEPS}" in shown and "(finished)" in shown
    assert f"checkpoint step {STEPS}: verified" in shown
    status = json.loads(run_cli("status", job_id, "--json", "--quick").stdout)
    assert status["job"]["JobName"] == HOSTILE and status["run"]["run_dir"] == str(run_dir)
    assert status["run"]["finished"] and status["run"]["step"] == STEPS


def test_dry_run_prints_a_valid_sbatch_script(slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / f"dry {HOSTILE}"
    script = run_cli("submit", "configs/tiny.yaml", *tiny_data, *COMMON, "--run-dir", str(run_dir),
                     "--job-name", HOSTILE, "--time", "1-02:03:04", "--dry-run").stdout
    assert not run_dir.exists()  # a dry run writes nothing
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    test_only = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    options = dict(shlex.split(line.removeprefix("#SBATCH "))[0].lstrip("-").partition("=")[::2]
                   for line in script.splitlines() if line.startswith("#SBATCH "))
    assert options["job-name"] == HOSTILE
    assert options["output"] == f"{run_dir}/slurm/%j_0_log.out"
    assert options["ntasks-per-node"] == "2" and options["nodes"] == "1" and options["time"] == str(26 * 60 + 4)
    assert options["signal"] == "USR1@120" and "requeue" in options and "gpus-per-node" not in options
    command = [shlex.split(line) for line in script.splitlines() if "submitit.core._submit" in line]
    assert command == [["exec", sys.executable, "-u", "-m", "submitit.core._submit", f"{run_dir}/slurm"]]

    bad = run_cli("submit", "configs/tiny.yaml", "--job-name", "two\nlines", "--dry-run", check=False)
    assert bad.returncode == 2 and "control character" in bad.stderr and len(bad.stderr.splitlines()) == 1
    bad = run_cli("submit", "configs/tiny.yaml", "--run-dir", str(tmp_path / "100%"), "--dry-run", check=False)
    assert bad.returncode == 2 and "'%'" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_warning_signal_then_preemption_resume_exactly(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, tiny_data)
    # What Slurm sends slurm.signal_seconds before the time limit (--signal=USR1@120): USR1 to every task.
    wait_for_step(run_dir, job_id, 4)
    slurm("scancel", "--signal=USR1", job_id)
    wait_for_step(run_dir, job_id, max(losses(run_dir)) + 3, restarts=1)
    # Preemption: Slurm sends SIGTERM to the whole job and requeues it itself.
    slurm("scontrol", "requeue", job_id)
    state = wait_for_end(job_id)
    log = job_log(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", log[-4000:]
    assert losses(run_dir) == reference["losses"]  # every step's loss, to the last bit
    assert "signal 10: saving step" in log and "signal 15: saving step" in log
    assert log.count("resumed from") == 2
    # The job requeued itself after the warning signal; after the preemption Slurm did.
    assert [entry["exit_code"] for entry in requeues(run_dir)] == [75]


def test_sbatch_template_trains_and_survives_a_warning_signal(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # the environment, active
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", f"--output={tmp_path}/slurm-%j.out", "slurm/train.sbatch", "configs/tiny.yaml", *tiny_data,
         *COMMON, "--run-dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip()
    wait_for_step(run_dir, job_id, 4)
    # The signal to the batch step only (as --signal=B:USR1@120 would send it) is forwarded to the ranks.
    slurm("scancel", "--batch", "--signal=USR1", job_id)
    state = wait_for_end(job_id)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert losses(run_dir) == reference["losses"]
    assert "signal 10: saving step" in log and log.count("resumed from") == 1
    assert [entry["exit_code"] for entry in requeues(run_dir)] == [75]
    shown = run_cli("status", job_id).stdout  # the job, and where to look for its run
    assert f"job {job_id} (pretrain): COMPLETED" in shown and "pass its run directory" in shown


def test_cancel_saves_and_does_not_requeue(slurm_cluster, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    # With a data worker: Slurm signals every process of the job, the worker too, which must leave it to its rank.
    job_id = submit(run_dir, tiny_data, "data.num_workers=1")
    wait_for_step(run_dir, job_id, 2)
    run_cli("cancel", job_id)
    state = wait_for_end(job_id)
    time.sleep(2)
    state = job(job_id)
    log = job_log(run_dir, job_id)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", log[-4000:]
    assert "signal 15: saving step" in log  # the ranks saved before Slurm's KillWait ran out
    assert requeues(run_dir) == []


def test_failure_at_the_same_step_stops_requeuing(slurm_cluster, tiny_data, tmp_path):
    # A truncated eval shard: every run fails at its first evaluation (step 3), after the checkpoint of step 2.
    eval_dir = Path(next(o for o in tiny_data if o.startswith("data.eval=")).partition("=")[2])
    broken = tmp_path / "eval"
    shutil.copytree(eval_dir, broken)
    for shard in broken.glob("*.tar"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, tiny_data, f"data.eval={broken}", "train.eval_every=3", "checkpoint.every_steps=2",
                    "slurm.max_requeues=2")
    state = wait_for_end(job_id)
    log = job_log(run_dir, job_id)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "2", log[-4000:]
    assert [entry["step"] for entry in requeues(run_dir)] == [2, 2]
    assert log.count("error: shard") >= 3  # every run failed on the broken shard...
    assert log.count("requeuing, it resumes from checkpoint step 2") == 2 and "not requeuing" in log
    assert max(losses(run_dir)) == 3


def test_a_hang_is_named_in_the_job_log_and_ends_the_job_with_the_hang_code(slurm_cluster, tiny_data, tmp_path):
    """Rank 1 is stopped (SIGSTOP) after step 2: rank 0 reports the hang, its line naming rank 1 is in the job's
    log once, srun ends the stopped rank, and the batch step exits 124; with launch.max_restarts=0 and
    slurm.max_requeues=0 the job ends FAILED with that exit code rather than restarting or requeuing."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, tiny_data, "train.hang_timeout_s=15", "launch.max_restarts=0", "slurm.max_requeues=0")
    wait_for_step(run_dir, job_id, 2)
    rank_process(run_dir, 1).suspend()
    state = wait_for_end(job_id)
    log = job_log(run_dir, job_id)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "124:0", log[-4000:]
    [line] = [line for line in log.splitlines() if "hang:" in line]
    assert re.search(r"rank 1 \(host node\d\) does not respond \(last: .*\); rank 0 waits in a collective", line), line
    assert f"job {job_id} hung (exit code 124) at checkpoint step 0 after 0 requeue(s)" in log


TWO_NODES = ["slurm.nodes=2", "slurm.tasks_per_node=1"]


def rank_starts(run_dir: Path) -> list[tuple[str, str, str]]:
    """(rank, host, rendezvous address) of every start of every rank, from the lines the ranks log first."""
    found = []
    for log in sorted((run_dir / "logs").glob("rank*.log")):
        found += re.findall(r"^\[pretrain\] rank (\d+) of 2 on host (\S+), rendezvous at (\S+)$", log.read_text(),
                            re.MULTILINE)
    return found


def rendezvous(job_id: str) -> str:
    """Where the ranks of a two-node job meet (launch.rank): the first node, a port from the job id."""
    return f"node1:{20000 + int(job_id) % 40000}"


def test_two_nodes_train_as_one_node_with_two_tasks(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, tiny_data, *TWO_NODES)
    state = wait_for_end(job_id)
    log = job_log(run_dir, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", log[-4000:]
    shown = slurm("scontrol", "show", "job", job_id).stdout
    assert "NumNodes=2 " in shown and " NodeList=node[1-2]" in shown and "NumTasks=2 " in shown
    # Each rank on its own node (its own network namespace and host name); both meet at the first node by name.
    assert rank_starts(run_dir) == [("0", "node1", rendezvous(job_id)), ("1", "node2", rendezvous(job_id))]
    assert losses(run_dir) == reference["losses"]  # gloo across the nodes sums as it does on one


def rank_process(run_dir: Path, rank: int) -> psutil.Process:
    """The trainer process of `rank` in the run (started by srun, in its node's namespace)."""
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "launch.rank" in cmdline and str(run_dir) in cmdline:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.environ().get("SLURM_PROCID") == str(rank):
                    return process
    raise AssertionError(f"no process of rank {rank} runs for {run_dir}")


def test_two_node_job_resumes_exactly_after_a_preemption_and_a_killed_rank(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, tiny_data, *TWO_NODES, "checkpoint.every_steps=4")
    # Preemption: SIGTERM to the ranks on both nodes; they save at their next step boundary and Slurm requeues.
    wait_for_step(run_dir, job_id, 3)
    slurm("scontrol", "requeue", job_id)
    wait_for_step(run_dir, job_id, 10, restarts=1)
    # A rank lost on the second node (as with a crash there): the batch step starts both ranks again in the job.
    rank1 = rank_process(run_dir, 1)
    assert rank1.environ()["SLURMD_NODENAME"] == "node2"
    saved_before_kill = complete_steps(run_dir / "checkpoints")[-1]
    rank1.kill()
    state = wait_for_end(job_id)
    log = job_log(run_dir, job_id)
    # Slurm requeued the job once (the preemption); the kill cost no requeue.
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    assert losses(run_dir) == reference["losses"]  # every step, the ones trained again after the kill too
    assert requeues(run_dir) == []

    # The restart resumed from the newest checkpoint complete when the rank was killed.
    [restart] = read_restarts(run_dir)
    assert restart["checkpoint_step"] >= saved_before_kill >= 8 and restart["exit_code"] not in (0, 2, 75)
    assert (f"restart 1 of 3: the job step failed (srun exit code {restart['exit_code']}) after step "
            f"{restart['after_step']} (newest checkpoint step {restart['checkpoint_step']}); starting every rank "
            "again from checkpoint") in log
    assert restart["next_step_s"] is not None and restart["teardown_s"] is None  # srun ends the step's tasks
    # Rank 0 logs the save; Slurm signals both nodes, and rank 0 may hear of it from rank 1 before its own arrives.
    saved_on_signal = [int(step) for step in re.findall(r"signal (?:15|on another rank): saving step (\d+)", log)]
    resumed = [int(step) for step in re.findall(r"resumed from .* at step (\d+),", log)]
    assert resumed == [*saved_on_signal, restart["checkpoint_step"]] and len(saved_on_signal) == 1, log[-4000:]
    assert rank_starts(run_dir) == [("0", "node1", rendezvous(job_id))] * 3 + [("1", "node2", rendezvous(job_id))] * 3
