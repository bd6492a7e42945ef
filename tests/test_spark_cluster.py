"""A real Spark standalone cluster on this machine: a master and two workers, each a separate
JVM started with pyspark's own ``bin/spark-class`` on 127.0.0.1, as docs/spark.md, "Running
on a cluster" starts them. ``score`` and ``rescore --engine spark --ship-bundles`` run against
it from the command line and agree with DuckDB; one worker killed mid-job does not stop the
job, and the store holds every row once. The cluster starts once per test session."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install 'anime-udf[spark]')")
if shutil.which("java") is None:
    pytest.skip("no Java runtime for the Spark cluster", allow_module_level=True)

import anime_udf  # noqa: E402
from anime_udf.catalog import read_catalog  # noqa: E402
from anime_udf.rescore import rescore  # noqa: E402
from anime_udf.rescore.on_spark import current_snapshot  # noqa: E402
from tests.conftest import CATALOG  # noqa: E402

# A Spark cluster, three JVMs (slow); this process reads the cache the executors read, so that the
# engines are compared on the same cached embeddings (every test starts cold otherwise).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("warm_cache")]

ROOT = Path(__file__).resolve().parents[1]
# The documented commands (docs/spark.md, "Running on a cluster"), with their ports; the tests run them
# with port 0 in their place (the JVMs choose, Cluster reads the ports back).
MASTER = "$SPARK_HOME/bin/spark-class org.apache.spark.deploy.master.Master --host 127.0.0.1 --port 7077 --webui-port 8080"
WORKER = ("$SPARK_HOME/bin/spark-class org.apache.spark.deploy.worker.Worker spark://127.0.0.1:7077 --host 127.0.0.1 "
          "--cores 1 --memory 2g --webui-port {ui}")
SCORE = ("anime-udf score --engine spark --master spark://127.0.0.1:7077 --ship-bundles "
         "--data catalog.parquet --out scored/")
RESCORE = ("anime-udf rescore --engine spark --master spark://127.0.0.1:7077 --ship-bundles "
           "--catalog catalog.parquet --store scores/")
# Spark settings from the CLI (--conf, as spark-submit's) and a job that spark-submit runs (examples/spark).
EXECUTOR_CACHE = "--conf spark.executorEnv.ANIME_UDF_CACHE=/local-disk/anime-udf"
SCORE_WITH_CONF = SCORE.replace("--ship-bundles", f"--ship-bundles {EXECUTOR_CACHE}")
SUBMIT = (f"$SPARK_HOME/bin/spark-submit --master spark://127.0.0.1:7077 {EXECUTOR_CACHE} "
          "--conf spark.executorEnv.HF_HUB_OFFLINE=1 examples/spark/score_catalog.py catalog.parquet scored/ "
          "--models models")
WORKER_UI_PORTS = (8081, 8082)


def spark_home() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent)


class Cluster:
    """The master and workers of one session; ``argv`` turns a documented command into this cluster's.

    Every port is 0 (the JVM binds a free one itself) and read back from the logs: a port picked
    here and bound later by the JVM can be taken in between (a worker's own random ports, another
    Spark UI), and the master then answers on another port."""

    def __init__(self, base: Path, cache: Path):
        self.base = base
        self.url = self.ui = None
        # What a cluster image provides its workers (docs/spark.md: the Python environment, the cache).
        self.env = {**os.environ, "SPARK_HOME": spark_home(), "SPARK_LOCAL_IP": "127.0.0.1",
                    "PYSPARK_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
                    "ANIME_UDF_CACHE": str(cache),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.processes: dict[str, subprocess.Popen] = {}

    def argv(self, command: str) -> list[str]:
        return command.replace("spark://127.0.0.1:7077", self.url).split()

    def start(self, name: str, argv: list[str]) -> None:
        argv[0] = str(Path(self.env["SPARK_HOME"]) / "bin" / "spark-class")
        log = open(self.base / f"{name}.log", "w")
        # Each in its own process group: killing a worker's group kills its executor and Python workers too.
        self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, cwd=self.base)

    def start_master(self) -> None:
        self.start("master", MASTER.replace("--port 7077", "--port 0").replace("--webui-port 8080", "--webui-port 0")
                   .split())
        self.url = "spark://127.0.0.1:" + self.from_log("master", r"Starting Spark master at spark://127\.0\.0\.1:(\d+)")
        self.ui = int(self.from_log("master", r"Successfully started service 'MasterUI' on port (\d+)"))

    def start_worker(self, name: str) -> None:
        self.start(name, self.argv(WORKER.format(ui=0)))

    def from_log(self, name: str, pattern: str, timeout: float = 60) -> str:
        log = self.base / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.processes[name].poll() is None:
            if found := re.search(pattern, log.read_text()):
                return found.group(1)
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not log {pattern!r}:\n{log.read_text()[-3000:]}")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json/", timeout=5) as response:
            status = json.loads(response.read())
        assert status["url"] == self.url, status  # this session's master, not another Spark UI
        return status

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.status()["aliveworkers"] >= n:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in self.base.glob("*.log"))
        raise RuntimeError(f"the Spark cluster did not come up with {n} workers:\n{logs}")

    def kill(self, name: str) -> None:
        os.killpg(self.processes[name].pid, signal.SIGKILL)
        self.processes[name].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, session_cache):
    # The workers share the tests' embedding cache (warm from the other tests), which keeps
    # this module's time to the cluster's own; on a real cluster each has its own.
    cluster = Cluster(tmp_path_factory.mktemp("spark-cluster"), session_cache)
    try:
        cluster.start_master()
        for i in range(len(WORKER_UI_PORTS)):
            cluster.start_worker(f"worker-{i}")
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-catalog") / "catalog.parquet"
    read_catalog(CATALOG).select("anime_id", "synopsis", "genres", "studio", "episodes").write_parquet(path)
    return path


def anime_udf_command(cluster: Cluster, command: str, cwd: Path, *extra: str, **kw) -> subprocess.Popen:
    """A documented command run against the cluster, from ``cwd``, the driver on this machine."""
    argv = [sys.executable, "-c", "from anime_udf.cli import cli; cli()", *cluster.argv(command)[1:], *extra]
    return subprocess.Popen(argv, cwd=cwd, env={**cluster.env, "ANIME_UDF_CACHE": os.environ["ANIME_UDF_CACHE"]},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finished(process: subprocess.Popen, timeout: float = 400) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}:\n{err[-4000:]}\n{out[-2000:]}"
    return out


def duckdb_scores(catalog: Path, baseline: Path, fusion: Path) -> pl.DataFrame:
    con = duckdb.connect()
    anime_udf.register(con, baseline=baseline, fusion=fusion)
    return con.sql(f"SELECT anime_id, predict_score(synopsis, genres, studio, episodes) AS baseline, "
                   f"predict_score_fusion(synopsis, genres, studio, episodes) AS fusion "
                   f"FROM read_parquet('{catalog}') ORDER BY anime_id").pl()


def work_dir(tmp_path: Path, catalog: Path, baseline: Path, fusion: Path) -> Path:
    """The documented layout: catalog.parquet and a models directory in the working directory."""
    shutil.copy(catalog, tmp_path / "catalog.parquet")
    (tmp_path / "models").mkdir(exist_ok=True)
    for bundle in (baseline, fusion):
        if not (tmp_path / "models" / bundle.name).exists():
            shutil.copytree(bundle, tmp_path / "models" / bundle.name)
    return tmp_path


def test_the_docs_run_these_cluster_commands():
    page = (ROOT / "docs" / "spark.md").read_text()
    section = page[page.index("## Running on a cluster"):]
    for command in (MASTER, *(WORKER.format(ui=ui) for ui in WORKER_UI_PORTS), SCORE, RESCORE, SCORE_WITH_CONF,
                    SUBMIT):
        assert command in section, command


def test_score_on_a_standalone_cluster_equals_duckdb(cluster, catalog, tmp_path, baseline_bundle, fusion_bundle):
    cwd = work_dir(tmp_path, catalog, baseline_bundle, fusion_bundle)
    out = finished(anime_udf_command(cluster, SCORE, cwd, "--models", "models"))
    assert "scored 400 rows with predict_score, predict_score_fusion on Spark" in out
    spark = pl.read_parquet(str(cwd / "scored" / "*.parquet")).sort("anime_id")
    expected = duckdb_scores(catalog, baseline_bundle, fusion_bundle)
    assert spark["anime_id"].to_list() == expected["anime_id"].to_list()
    for column, name in (("baseline", "predict_score"), ("fusion", "predict_score_fusion")):
        np.testing.assert_allclose(spark[name].to_numpy(), expected[column].to_numpy(), rtol=0, atol=1e-5)
    assert cluster.status()["completedapps"]  # the job ran on the cluster's executors


@pytest.mark.parametrize("command", [SCORE_WITH_CONF, SUBMIT], ids=["cli-conf", "spark-submit"])
def test_spark_settings_reach_the_executors(cluster, catalog, tmp_path, baseline_bundle, fusion_bundle, command):
    """The documented --conf setting of the executors' embedding cache takes effect, from the CLI and
    from spark-submit running the example job: the executors fill that cache, not the workers' own."""
    cwd = work_dir(tmp_path, catalog, baseline_bundle, fusion_bundle)
    pl.read_parquet(catalog).head(24).write_parquet(cwd / "catalog.parquet")  # a cold cache: few synopses
    cache = tmp_path / "executor-cache"
    argv = [str(ROOT / a) if a.startswith("examples/") else a
            for a in cluster.argv(command.replace("/local-disk/anime-udf", str(cache)))]
    if argv[0].endswith("spark-submit"):
        argv[0] = str(Path(cluster.env["SPARK_HOME"]) / "bin" / "spark-submit")
        job = subprocess.Popen(argv, cwd=cwd, env={**cluster.env, "ANIME_UDF_CACHE": os.environ["ANIME_UDF_CACHE"]},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        job = anime_udf_command(cluster, " ".join(argv), cwd, "--models", "models")
    assert "scored 24 rows with predict_score, predict_score_fusion on Spark" in finished(job)
    assert pl.read_parquet(str(cwd / "scored" / "*.parquet")).height == 24
    with sqlite3.connect(cache / "embeddings.sqlite") as db:  # made by the executors: the setting took effect
        assert db.execute("SELECT count(*) FROM embeddings").fetchone()[0] > 0


def stored_vs_duckdb(store: Path, catalog: Path, tmp_path: Path, baseline: Path, fusion: Path):
    scores = pl.read_parquet(str(current_snapshot(store) / "scores" / "*.parquet"))
    duck = rescore(catalog, tmp_path / "duck.duckdb", models=[str(baseline), str(fusion)])
    con = duckdb.connect(str(tmp_path / "duck.duckdb"), read_only=True)
    expected = con.sql("SELECT key, model_kind, input_hash, score FROM rescore_scores").pl()
    con.close()
    return scores, expected, duck


def python_workers_running(cluster: Cluster, worker: str) -> bool:
    """Whether the worker's process group runs PySpark Python workers (tasks with Python UDFs)."""
    group = cluster.processes[worker].pid
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == group and \
                    re.search(rb"pyspark\.(daemon|worker)", (proc / "cmdline").read_bytes()):
                return True
        except (OSError, ProcessLookupError):
            continue
    return False


def test_rescore_on_a_cluster_losing_a_worker_mid_job_finishes_and_equals_duckdb(
        cluster, catalog, tmp_path, baseline_bundle, fusion_bundle):
    """Last in this module: the cluster has one worker afterwards. (One job for both checks:
    each cluster job costs tens of seconds of executor and Python worker start-up.)"""
    cwd = work_dir(tmp_path, catalog, baseline_bundle, fusion_bundle)
    job = anime_udf_command(cluster, RESCORE, cwd, "--models", "models", "--json")
    victim = "worker-1"
    deadline = time.monotonic() + 180
    while not python_workers_running(cluster, victim):
        assert job.poll() is None, "the job finished before the worker ran a task: " + (job.communicate()[1][-2000:])
        assert time.monotonic() < deadline, "no task reached the worker"
        time.sleep(0.2)
    cluster.kill(victim)  # its JVM, its executor and the executor's Python workers
    report = json.loads(finished(job))
    assert cluster.status()["aliveworkers"] == 1
    assert [(m["model_kind"], m["rows_scored"]) for m in report["models"]] == [("baseline", 400), ("fusion", 400)]
    scores, expected, duck = stored_vs_duckdb(cwd / "scores", catalog, tmp_path, baseline_bundle, fusion_bundle)
    assert scores.height == 800 and scores.select("key", "model_kind").n_unique() == 800  # every row once
    assert report["catalog_fingerprint"] == duck.catalog_fingerprint
    joined = scores.join(expected, on=["key", "model_kind"], suffix="_duckdb")
    assert joined.height == expected.height == 800
    assert (joined["input_hash"] == joined["input_hash_duckdb"]).all()
    np.testing.assert_allclose(joined["score"].to_numpy(), joined["score_duckdb"].to_numpy(), rtol=0, atol=1e-5)
