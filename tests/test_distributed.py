"""Scale-out: DDP training under torchrun (2 CPU processes, gloo) and search workers sharing one storage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch

from slimformer import distributed, models
from slimformer.search import SearchConfig, SearchSpace, _owner, _stale_trials_to_fail, run_search
from slimformer.tasks import load_task_data
from slimformer.testing import tiny_bert, write_sst2_folder

# One thread per process: the test machine is small and shared.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "TOKENIZERS_PARALLELISM": "false"}


def _leftovers(folder: Path) -> list[str]:
    """Temporary or work folders that a finished job must not leave behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


@pytest.mark.parametrize("command", ["finetune", "distill"])
def test_training_under_torchrun_saves_once_and_matches_one_process(tmp_path, command):
    teacher = models.save(tiny_bert(num_hidden_layers=2), tmp_path / "teacher")
    data = write_sst2_folder(tmp_path / "data", n=32)
    # 24 examples: 3 global batches of 8 per epoch, split 4 + 4 over two processes; no uneven last batch.
    args = [command, "--teacher" if command == "distill" else "--model", str(teacher), "--data", str(data),
            "--epochs", "2", "--lr", "1e-3", "--precision", "fp32", "--max-train-examples", "24", "--json"]
    args += ["--layers", "1"] if command == "distill" else []
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "slimformer.cli", *args, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    result = json.loads(two.stdout)  # one JSON document: only the main process prints
    assert result["training"]["processes"] == 2 and result["training"]["steps"] == 6
    one = subprocess.run([sys.executable, "-m", "slimformer.cli", *args, "--batch-size", "8",
                          "--out", str(tmp_path / "one")], env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads(one.stdout)
    assert single["training"]["processes"] == 1 and single["training"]["steps"] == 6

    # Saved exactly once: one output folder each, no temporary or checkpoint folders left beside them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "one", "teacher", "two"]
    assert _leftovers(tmp_path) == []
    a, b, t = models.load(tmp_path / "two"), models.load(tmp_path / "one"), models.load(teacher)
    assert a.config.num_hidden_layers == (1 if command == "distill" else 2)
    assert a.record["history"][-1]["results"]["processes"] == 2
    # Same global batch, same data order: DDP's averaged gradients equal the single process's, so the weights
    # agree to float rounding while training moved them by orders of magnitude more.
    pb, pt = dict(b.model.named_parameters()), dict(t.model.named_parameters())
    diff = max((p - pb[n]).abs().max().item() for n, p in a.model.named_parameters())
    moved = max((p - pt[n]).abs().max().item() for n, p in a.model.named_parameters() if n in pt)
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)
    assert result["quality"]["value"] == pytest.approx(single["quality"]["value"])
    assert result["training"]["train_loss"] == pytest.approx(single["training"]["train_loss"], rel=1e-4)


def test_main_only_runs_directly_in_one_process():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.main_only(lambda: 42) == 42
    assert distributed.mean(3.5) == 3.5


def test_stale_trials_spare_live_workers(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="slimformer",
                                directions=["minimize", "minimize"])
    live, dead, elsewhere = study.ask(), study.ask(), study.ask()
    for t in (live, dead, elsewhere):
        t.suggest_categorical("depth", [1, 2])
    live.set_user_attr("worker", _owner())  # this very process: alive
    dead.set_user_attr("worker", {**_owner(), "started": 0.0})  # same pid number, another process: gone
    elsewhere.set_user_attr("worker", {**_owner(), "host": "some-other-machine"})  # unknowable here: left alone
    _stale_trials_to_fail(study)
    states = {t.number: t.state for t in study.get_trials()}
    running, failed = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL
    assert states[live.number] == running and states[elsewhere.number] == running
    assert states[dead.number] == failed
    assert study.get_trials()[-1].state == optuna.trial.TrialState.WAITING  # the dead one's parameters, queued again


SPACE = SearchSpace(depths=[2, 1], heads=[0.0, 0.5], ffn=[0.0], vocab=[False, True],
                    precisions=["fp32", "ort-dynamic-int8"], kd_epochs=1, recovery_epochs=1, kd_max_examples=32,
                    recovery_max_examples=32)

_WORKER = """
import json, sys, torch
torch.set_num_threads(1)
from slimformer.search import SearchConfig, run_search
from slimformer.tasks import load_task_data
teacher, data, out, config = sys.argv[1:5]
run_search(teacher, load_task_data(data), SearchConfig.model_validate_json(config), out, worker=True, progress=False)
"""


def test_search_workers_share_one_study_then_the_coordinator_reports(tmp_path):
    teacher = models.save(tiny_bert(num_hidden_layers=2), tmp_path / "teacher")
    data = write_sst2_folder(tmp_path / "data", n=48)
    out = tmp_path / "out"
    cfg = SearchConfig(trials=6, threads=1, space=SPACE, fresh_process_measurement=False, budget="quality_drop<=5",
                       storage=f"journal:{tmp_path / 'study.log'}", strategy="random")
    # Two workers that pose as two machines, so the coordinator must measure the decisive candidates again.
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(teacher), str(data), str(out),
                                 cfg.model_dump_json()], env={**ENV, "SLIMFORMER_HOST": f"worker-{i}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for w in workers:
        _, err = w.communicate(timeout=400)
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="slimformer", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "study.log"))))
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    complete = [t.user_attrs["candidate"] for t in trials]
    assert len(complete) >= cfg.trials
    measured = [c["name"] for t, c in zip(trials, complete, strict=True) if not t.user_attrs.get("reused")]
    assert len(measured) == len(set(measured)), measured  # no candidate was measured twice
    hosts = {c["params"]["measured_on"]["host"] for c in complete}
    assert hosts == {"worker-1", "worker-2"}, hosts  # both workers took part
    for c in complete:
        assert (Path(c["path"]) / models.RECORD_FILE).exists(), c["path"]  # every artifact is in the shared folder
    for folder in (out, out / "cache", out / "candidates"):
        if folder.exists():
            assert not [n for n in _leftovers(folder) if not n.startswith(".locks")], _leftovers(folder)

    # The coordinator (not a worker) finds the trials done, measures the deciding candidates on its own host
    # and writes the report.
    summary = run_search(str(teacher), load_task_data(data), cfg, out, progress=False)
    names = {c["name"] for c in summary["candidates"]}
    assert names == {c["name"] for c in complete}  # nothing lost, nothing doubled
    me = distributed.host()["host"]
    by_name = {c["name"]: c for c in summary["candidates"]}
    for name in summary["front"] + ([summary["chosen"]["name"]] if summary["chosen"] else []):
        where = by_name[name]["params"]
        assert where["measured_on"]["host"] == me and where["first_measured_on"]["host"].startswith("worker-")
    assert (out / "report.md").exists() and (out / "summary.json").exists()
    assert not torch.distributed.is_initialized()
