"""Units of work on Ray: a local cluster of 2 CPU workers, started by this module, against local runs.

Independent reference: the same command or library call run in this process (the LocalExecutor path
that every other test exercises). The kill tests make a worker die (``os._exit``) or the run fail
mid-way, then check that every unit is in the final table exactly once and equals the local run.
"""

from __future__ import annotations

import os
import sys

import pandas as pd
import pytest
from conftest import require

from codi_lens import load_pretrained
from codi_lens.accuracy import Condition, answer_rows, unit_id
from codi_lens.data import load_problems
from codi_lens.run.executors import DistributedError, RayExecutor, make_executor
from codi_lens.run.store import UNIT_COLUMN, ResultStore
from experiments import step_importance

BUDGET = 24  # answer tokens: toy answers are about 6 tokens


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs: two single-threaded workers, each holding its own model (the tests
    that need it skip without the ray extra, or fail in CI; the two at the end run without Ray)."""
    ray = require("ray", "the ray extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=150 * 2**20)
    yield RayExecutor()
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return load_pretrained()


@pytest.fixture(scope="module")
def problems():
    return load_problems("toy-chain:test", limit=24)


def test_experiment_on_ray_writes_the_same_table_as_a_local_run(cluster, tmp_path):
    flags = ["--limit", "8", "--interventions", "zero,mean,swap", "--batch-size", "4", "--max-new-tokens", "32"]
    step_importance.main([*flags, "--out", str(tmp_path / "local")])
    step_importance.main([*flags, "--out", str(tmp_path / "ray"), "--ray", "local"])
    local = pd.read_parquet(tmp_path / "local" / "results.parquet")
    on_ray = pd.read_parquet(tmp_path / "ray" / "results.parquet")
    assert len(local) == len(on_ray) > 0
    exact = [c for c in local.columns if local[c].dtype.kind not in "f"]
    pd.testing.assert_frame_equal(local[exact], on_ray[exact])  # ids, conditions, answers, flips
    # float32 metrics: workers run 1 torch thread, this process 2; reductions may differ in the last bits
    floats = [c for c in local.columns if local[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(local[floats], on_ray[floats], check_exact=False, rtol=1e-4, atol=1e-5)


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, model, problems, tmp_path):
    condition = Condition("latents", model, max_new_tokens=BUDGET)
    marker = tmp_path / "killed-once"
    victim = problems[9].id  # in the third of six batches

    def work(batch):
        if any(p.id == victim for p in batch) and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies; Ray reruns its task on a fresh worker
        return answer_rows(condition, batch)

    store = ResultStore(tmp_path / "ray", {"n": len(problems)})
    rows = store.run(problems, work, unit_id=lambda p: unit_id(condition, p), batch_size=4, executor=cluster)
    local = ResultStore(tmp_path / "local", {"n": len(problems)}).run(
        problems, lambda b: answer_rows(condition, b), unit_id=lambda p: unit_id(condition, p), batch_size=4
    )
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker really died
    assert rows[UNIT_COLUMN].tolist() == [unit_id(condition, p) for p in problems]  # each unit once, in order
    assert len(list(store.parts.glob("part-*.parquet"))) == 6  # one part per batch, none written twice
    pd.testing.assert_frame_equal(rows, local)


def test_a_run_that_died_resumes_on_ray_to_the_local_table(cluster, model, problems, tmp_path):
    condition = Condition("latents", model, max_new_tokens=BUDGET)
    failing = problems[13].id

    def crashing(batch):
        if any(p.id == failing for p in batch):
            raise RuntimeError("the cluster went away")
        return answer_rows(condition, batch)

    store = ResultStore(tmp_path / "ray", {"n": len(problems)})
    ids = lambda p: unit_id(condition, p)  # noqa: E731
    with pytest.raises(Exception, match="the cluster went away"):
        store.run(problems, crashing, unit_id=ids, batch_size=4, executor=cluster)
    done_before = store.done()
    assert 0 < len(done_before) < len(problems)
    assert unit_id(condition, problems[13]) not in done_before

    resumed = ResultStore(tmp_path / "ray", {"n": len(problems)})  # a new process would open it like this
    rows = resumed.run(problems, lambda b: answer_rows(condition, b), unit_id=ids, batch_size=4, executor=cluster)
    local = answer_rows(condition, problems)
    assert rows[UNIT_COLUMN].tolist() == local[UNIT_COLUMN].tolist()
    pd.testing.assert_frame_equal(rows, local)


def test_a_model_built_in_memory_is_refused_by_name(cluster, tmp_path):
    built = load_pretrained()
    built.source = None  # as for a model assembled in memory (training, benchmarks)
    condition = Condition("latents", built, max_new_tokens=BUDGET)
    store = ResultStore(tmp_path, {})
    with pytest.raises(DistributedError, match="built in memory"):
        store.run(
            load_problems("toy-chain:test", limit=2),
            lambda b: answer_rows(condition, b),
            unit_id=lambda p: p.id,
            batch_size=2,
            executor=cluster,
        )


def test_without_ray_the_flag_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(DistributedError, match=r"codi-lens\[ray\]"):
        make_executor("local")


def test_without_ray_the_command_fails_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    from experiments import evaluate

    with pytest.raises(SystemExit) as exit_info:
        evaluate.run_main(evaluate.main, ["--limit", "2", "--ray", "local", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --ray needs Ray")
