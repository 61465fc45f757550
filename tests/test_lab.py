"""The lab's deployment, on its real servers (tests/lab.py: MLflow with basic authentication and Prefect with an
auth string, both on PostgreSQL): who may talk to them, and a study on a work pool whose worker dies mid-cell.
Apart from tests/test_pipeline.py, whose deployment test is as long, so that the two run side by side."""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from conftest import BIN, MARKER, REPO, make_project, marked_processes, project_env, run
from lab import LAB_USER, MLFLOW_CREDENTIALS, POLL_EVERY_SECOND, assert_no_secret_logged, basic_auth, lab_auth, prefect, prefect_api, runs_stage
from servers import mlflow_server, postgres_bin, serving


def test_the_lab_servers_refuse_whoever_has_no_credentials_and_grpolab_names_a_wrong_one(tmp_path, servers):
    """The servers of `servers`, as docker/compose.yaml runs them: a request without credentials, or with a wrong
    password, gets 401 and changes nothing; grpolab refuses a wrong or missing password before any work, naming
    the variable and never printing the password; the MLflow UI keeps grpolab's runs view behind the login; and
    a restart with a new MLFLOW_AUTH_ADMIN_PASSWORD rotates the password."""
    from grpolab.ui import SCRIPT

    pg, uri, env, folder = servers
    body = json.dumps({"name": "intruder"}).encode()
    for credentials in (None, f"{LAB_USER}:wrong-password"):
        auth = basic_auth(credentials) if credentials else {}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/create", body, {"Content-Type": "application/json", **auth}), timeout=30)
        assert refused.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            prefect_api({**env, "PREFECT_API_AUTH_STRING": credentials or ""}, "work_pools/", {"name": "intruder", "type": "process"})
        assert refused.value.code == 401
    assert MlflowClient(uri).get_experiment_by_name("intruder") is None
    assert prefect_api(env, "work_pools/filter", {"work_pools": {"name": {"any_": ["intruder"]}}}) == []
    page = urllib.request.urlopen(urllib.request.Request(f"{uri}/", headers=basic_auth(f"{LAB_USER}:{env['MLFLOW_TRACKING_PASSWORD']}")), timeout=30)
    assert SCRIPT in page.read().decode()  # `grpolab ui`'s runs view, behind the login

    project = make_project(tmp_path / "p")
    shutil.copytree(REPO / "studies", project / "studies")
    before = (project / "params.yaml").read_bytes()
    refusals = {
        "MLFLOW_TRACKING_PASSWORD": f"MLFLOW_TRACKING_PASSWORD: the MLflow server {uri} refused user 'grpolab' with this password "
                                    "(401 Unauthorized: a wrong user name or password); nothing was run",
        "MLFLOW_TRACKING_USERNAME": f"the MLflow server {uri} asks for a user name and password (401 Unauthorized): set "
                                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_AUTH_STRING": f"PREFECT_API_AUTH_STRING: the Prefect server {env['PREFECT_API_URL']} refused it (401 Unauthorized: "
                                   "a wrong user or password",
    }
    for key, message in refusals.items():
        wrong = {**project_env(), **env, "MLFLOW_TRACKING_URI": uri, key: "wrong-password"}
        if key == "MLFLOW_TRACKING_USERNAME":
            wrong = {k: v for k, v in wrong.items() if k not in MLFLOW_CREDENTIALS}
        study = [["study", "studies/smoke.yaml", "--pool", "nodes"]] if key == "PREFECT_API_AUTH_STRING" else []  # checked as `run` checks
        for command in (["run", "-S", "sft.steps=3"], *study):
            proc = subprocess.run([f"{BIN}/grpolab", *command], cwd=project, env=wrong, capture_output=True, text=True, timeout=300)
            said = proc.stdout + proc.stderr
            assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (key, command, said[-3000:])
            assert "==> stage" not in said and "Traceback" not in said and env["MLFLOW_TRACKING_PASSWORD"] not in said
    assert (project / "params.yaml").read_bytes() == before and not (project / "reports").exists()

    # Rotation, on a server of its own: restarted with a new password, the old one is refused and the new one works.
    host, port = pg.split(":")
    for name in ("rotated", "rotated_auth"):
        subprocess.run([postgres_bin("createdb"), "-h", host, "-p", port, "-U", "grpolab", name], check=True, capture_output=True)
    settings, _, old = lab_auth(pg)
    settings["GRPOLAB_MLFLOW_AUTH_DATABASE_URI"] = f"postgresql://grpolab@{pg}/rotated_auth"
    new = secrets.token_hex(16)
    for i, password in enumerate((old, new)):
        (tmp_path / f"rotation-{i}").mkdir()
        with mlflow_server(f"postgresql://grpolab@{pg}/rotated", tmp_path / f"rotation-{i}", {**settings, "MLFLOW_AUTH_ADMIN_PASSWORD": password}) as rotated:
            accepted = {}
            for tried in (old, new):
                try:
                    urllib.request.urlopen(urllib.request.Request(f"{rotated}/api/2.0/mlflow/experiments/search?max_results=1",
                                                                  headers=basic_auth(f"{LAB_USER}:{tried}")), timeout=30)
                    accepted[tried] = True
                except urllib.error.HTTPError as exc:
                    assert exc.code == 401
                    accepted[tried] = False
            assert accepted == {old: password == old, new: password == new}


def kill_a_worker_mid_train(workers: dict[str, subprocess.Popen], client: MlflowClient, study: subprocess.Popen) -> tuple[str, str, str, list]:
    """Once a cell's train stage is under way on a worker (its MLflow run RUNNING), kill -9 that worker's process
    alone, as a crash of it would; returns the worker's name, the cell's, its train run's id and the processes the
    worker had started."""
    from grpolab.study.experiments import CELL_MARKER

    deadline = time.monotonic() + 600
    while study.poll() is None and time.monotonic() < deadline:
        for name, worker in workers.items():
            below = psutil.Process(worker.pid).children(recursive=True)
            for proc in [p for p in below if runs_stage(p, "train")]:
                with contextlib.suppress(psutil.Error, KeyError, ValueError):  # not yet: no RUNNING train run
                    variant, seed = proc.environ()[CELL_MARKER].rsplit("/", 1)[1].rsplit("-s", 1)
                    experiment = client.get_experiment_by_name("smoke").experiment_id
                    [train] = client.search_runs([experiment], f"tags.`grpolab.stage` = 'train' and attributes.status = 'RUNNING' and "
                                                               f"tags.`grpolab.variant` = '{variant}' and tags.`grpolab.seed` = '{seed}'")
                    worker.kill()
                    worker.wait()
                    return name, f"{variant}-s{seed}", train.info.run_id, below
        time.sleep(0.2)
    raise AssertionError("no cell reached its train stage while the study ran")


def test_a_study_on_a_work_pool_with_two_workers_in_their_own_clones(tmp_path, servers):
    """The smoke study on one seed (a second would show the same again, at twice the cells' cost) sent to a
    Prefect work pool (`grpolab study --pool`) whose two process workers each run in their own clone of the project
    (two folders for two nodes), every cell logging to the MLflow server and the clones sharing one DVC cache: both
    workers ran cells, the seed's shared stages ran once in all, the report is what MLflow holds, and no clone's
    params.yaml or git tree changed. One worker is killed (-9) while a cell trains: the cell's processes die with
    it, Prefect's heartbeat automation marks its flow run Crashed, the driver marks its MLflow runs KILLED and the
    cell runs again on whichever worker is free (the dead one is started again meanwhile, in its clone, where the
    killed cell left its temporary workspace)."""
    from test_study import committed_project, complete_parents

    _, uri, prefect_env, folder = servers
    origin = committed_project(tmp_path / "origin")  # the driver's checkout
    shutil.copy(REPO / "prefect.yaml", origin)
    smoke = origin / "studies" / "smoke.yaml"
    smoke.write_text(smoke.read_text().replace("seeds: [0, 1]\n", "seeds: [0]\n", 1))
    identity = ["-c", "user.name=grpolab-test", "-c", "user.email=test@localhost"]
    run(["git", "add", "prefect.yaml", "studies/smoke.yaml"], origin)
    run(["git", *identity, "commit", "-qm", "deployments"], origin)
    cache = tmp_path / "shared-dvc-cache"  # a cache folder on the nodes' shared file system
    clones = {name: tmp_path / name for name in ("node-a", "node-b")}
    for clone in clones.values():
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)
        run([f"{BIN}/dvc", "cache", "dir", "--local", str(cache)], clone)  # .dvc/config.local: this clone's setting only
    before = {p: (p / "params.yaml").read_bytes() for p in (origin, *clones.values())}

    env = {**prefect_env, "MLFLOW_TRACKING_URI": uri, **POLL_EVERY_SECOND}
    prefect("work-pool", "create", "nodes", "--type", "process", "--overwrite", env=env, cwd=clones["node-a"])
    prefect("--no-prompt", "deploy", "--name", "cell", "--pool", "nodes", env=env, cwd=clones["node-a"])
    marker = f"pool-{os.getpid()}"
    client = MlflowClient(uri)
    with contextlib.ExitStack() as stack:
        def start_worker(name: str, log: Path) -> subprocess.Popen:  # one flow run at a time, as a worker per GPU would run
            worker_env = {**env, "GRPOLAB_PROJECT": str(clones[name]), MARKER: marker}
            return stack.enter_context(serving([f"{BIN}/prefect", "worker", "start", "--pool", "nodes", "--type", "process", "--limit", "1",
                                                "--name", name], log, lambda: True, f"worker {name}", worker_env))

        workers = {name: start_worker(name, tmp_path / f"{name}.log") for name in clones}
        # Prefect's shortest heartbeat interval (the driver hands its own to the cells): a dead worker's cell is
        # marked Crashed 75 s after its last heartbeat
        driver_env = {**env, MARKER: marker, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        with open(tmp_path / "study.out", "w") as out, open(tmp_path / "study.err", "w") as err:
            driver = subprocess.Popen([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--pool", "nodes"], cwd=origin, env=driver_env,
                                      stdout=out, stderr=err)
        try:
            dead, killed, killed_train, left = kill_a_worker_mid_train(workers, client, driver)
            _, alive = psutil.wait_procs(left, timeout=10)  # the cell's processes died with their worker, at once
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [" ".join(p.cmdline()) for p in alive]
            start_worker(dead, tmp_path / f"{dead}-restarted.log")  # the node is back: its clone holds what the killed cell left
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
    study = subprocess.CompletedProcess(driver.args, driver.returncode, (tmp_path / "study.out").read_text(), (tmp_path / "study.err").read_text())
    logs = {log.stem: log.read_text() for log in tmp_path.glob("node-*.log")}
    assert study.returncode == 0, f"{study.stdout[-3000:]}\n{study.stderr[-4000:]}\n" + "\n".join(f"{k}: {v[-2000:]}" for k, v in logs.items())
    assert "2/2 cells done" in study.stderr and f"done   {killed}" in study.stderr
    assert f"worker died: {killed} after " in study.stderr and "no heartbeat for 75 s" in study.stderr, study.stderr[-4000:]

    # Prefect's records: a cell flow run of each cell completed, and the killed cell's first one Crashed by the
    # heartbeat automation, on both workers' clones (each cell says where it ran)
    [deployment] = [d for d in prefect_api(env, "deployments/filter", {}) if d["name"] == "cell"]
    flow_runs = prefect_api(env, "flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert sorted(r["state"]["type"] for r in flow_runs) == ["COMPLETED"] * 2 + ["CRASHED"], [r["state"] for r in flow_runs]
    ran_in, crashed_in = {}, {}
    for flow_run in flow_runs:
        messages = [e["message"] for e in prefect_api(env, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})]
        [where] = [m for m in messages if m.startswith("cell ") and " of study smoke in " in m]
        record = crashed_in if flow_run["state"]["type"] == "CRASHED" else ran_in
        assert where.split()[1] not in record
        record[where.split()[1]] = Path(where.split(" in ")[1].split(" on ")[0])
    assert set(ran_in) == {"plain-s0", "outcome_conditional-s0"}
    assert set(ran_in.values()) | set(crashed_in.values()) == {c.resolve() for c in clones.values()}, ran_in  # both workers ran cells
    assert crashed_in == {killed: clones[dead].resolve()}, crashed_in  # its second run: in either clone, the dead one's has been cleaned
    [crashed] = [r for r in flow_runs if r["state"]["type"] == "CRASHED"]
    assert crashed["state"]["message"].startswith("no heartbeat for 75 s"), crashed["state"]
    # the killed cell's temporary DVC workspace went when its clone ran the cell again (if another clone did, it waits)
    cleaned = [c for c in clones.values() if c != clones[dead] or ran_in[killed] == clones[dead].resolve()]
    assert not [p for c in cleaned for p in (c / ".dvc" / "tmp" / "exps").glob("standalone/tmp*")]

    # MLflow: the two complete pipelines; the seed's shared stages ran once in all (restored from the shared cache
    # by the seed's other cell, wherever it ran)
    parents = {f"{r.data.tags['grpolab.variant']}-s{r.data.tags['grpolab.seed']}": r for r in complete_parents(client, "smoke")}
    assert set(parents) == set(ran_in)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=1000)
    finished = pd.Series([r.data.tags["grpolab.stage"] for r in runs if r.info.status == "FINISHED"]).value_counts()
    assert {s: finished.get(s, 0) for s in ("prepare", "sft", "mia", "train")} == {"prepare": 1, "sft": 1, "mia": 1, "train": 2}
    assert {"prepare", "sft", "mia"} <= set(parents["outcome_conditional-s0"].data.tags["grpolab.reused_stages"].split(", "))
    # the killed cell's first attempt: its train run KILLED by the driver (no orphan of it went on to finish it); no run left RUNNING
    assert client.get_run(killed_train).info.status == "KILLED"
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # the report, built by the driver, is what the store holds; each cell's DVC experiment is in its worker's clone
    from grpolab.study.report import report_from_store

    text = (origin / "reports" / "smoke" / "report.md").read_text()
    assert text == report_from_store(client, "smoke", tmp_path / "rebuilt") and "| `outcome_conditional` |" in text
    rows = [[v.strip(" `") for v in line.split("|")[1:-1]] for line in text.split("## Cells\n", 1)[1].split("\n## ")[0].splitlines()
            if line.startswith("| `")]
    assert sorted((f"{variant}-s{seed}", status, run_id) for variant, seed, status, _, run_id in rows) == sorted(
        (c, "finished", parents[c].info.run_id) for c in ran_in), rows  # every cell's row once, the killed one's too
    listed = {c: run([f"{BIN}/dvc", "exp", "ls", "--name-only"], clone).stdout.split() for c, clone in clones.items()}
    assert sorted(n for names in listed.values() for n in names) == sorted(f"smoke-{cell}" for cell in ran_in)
    for checkout in (origin, *clones.values()):
        assert (checkout / "params.yaml").read_bytes() == before[checkout]
        assert run(["git", "status", "--porcelain"], checkout).stdout == ""
    assert not marked_processes(marker)  # the workers' cells ended with them

    # On the local sqlite store, cells on other machines could not log: refused before any cell, naming why
    proc = subprocess.run([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--pool", "nodes"], cwd=origin, env=prefect_env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--pool nodes: the tracking store is sqlite:///" in proc.stderr, proc.stderr
    assert_no_secret_logged(prefect_env, uri, folder / "artifacts", study.stdout, study.stderr, *logs.values())
