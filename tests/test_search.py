import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.search import SearchConfig, SearchSpace, param_key, run_search
from slimformer.tasks import load_task_data
from slimformer.testing import tiny_bert, write_sst2_folder

SPACE = SearchSpace(depths=[2, 1], heads=[0.0, 0.5], ffn=[0.0], vocab=[False, True],
                    precisions=["fp32", "ort-dynamic-int8"], kd_epochs=1, recovery_epochs=1, kd_max_examples=32,
                    recovery_max_examples=32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    teacher = models.save(tiny_bert(num_hidden_layers=2), root / "teacher")
    data = write_sst2_folder(root / "data", n=48)
    return root, teacher, data


def test_search_delivers_front_choice_confirmation_and_report(setup):
    root, teacher, data = setup
    task = load_task_data(data)
    cfg = SearchConfig(trials=4, threads=1, space=SPACE, fresh_process_measurement=False, budget="quality_drop<=5")
    summary = run_search(str(teacher), task, cfg, root / "out", progress=False)
    names = [c["name"] for c in summary["candidates"]]
    assert "d2-h0-f0-v0-fp32" in names and "d2-h0-f0-v0-ort-dynamic-int8" in names  # the references
    assert summary["front"] and set(summary["front"]) <= set(names)
    chosen = summary["chosen"]
    assert chosen is not None and chosen["measurements"]["accuracy_drop"]["value"] <= 5
    conf = summary["confirmation"]
    assert conf["chosen"]["split"] == "eval" and "budget_holds_on_eval" in conf
    for f in ("report.md", "report.html", "pareto.png", "summary.json", "best/README.md", "best/slimformer.json"):
        assert (root / "out" / f).exists(), f
    assert "data:image/png;base64," in (root / "out" / "report.html").read_text()
    # The fp32 reference is the baseline itself: measured once, so its speed-up is exactly 1.
    base = next(c for c in summary["candidates"] if c["name"] == "d2-h0-f0-v0-fp32")
    assert base["measurements"]["speedup"]["value"] == 1.0


def test_bad_space_and_budget(setup):
    root, teacher, data = setup
    task = load_task_data(data)
    with pytest.raises(SlimformerError, match="do not fit a 2-layer teacher"):
        run_search(str(teacher), task, SearchConfig(space=SearchSpace(depths=[5]), fresh_process_measurement=False),
                   root / "bad", progress=False)
    with pytest.raises(SlimformerError, match="unknown budget quantity"):
        run_search(str(teacher), task, SearchConfig(budget="speed<=2"), root / "bad2", progress=False)


def test_time_budget_stops_new_candidates(setup):
    root, teacher, data = setup
    task = load_task_data(data)
    cfg = SearchConfig(trials=200, time_budget_s=20, threads=1, space=SPACE, fresh_process_measurement=False)
    t0 = time.time()
    summary = run_search(str(teacher), task, cfg, root / "timed", progress=False)
    elapsed = time.time() - t0
    assert len(summary["candidates"]) < 200
    assert elapsed < 20 + 45  # stops starting candidates in time; the final confirmation and report follow
    assert (root / "timed" / "report.md").exists()


def _completed(db: Path) -> list[str]:
    """Candidates measured to completion; a trial that reused a finished point's numbers measured nothing."""
    study = optuna.load_study(study_name="slimformer", storage=f"sqlite:///{db}")
    return [t.user_attrs["candidate"]["name"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if not t.user_attrs.get("reused")]


def test_killed_search_resumes_without_losing_or_repeating_candidates(setup):
    root, teacher, data = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "slimformer.cli", "search", "--model", str(teacher), "--data", str(data),
           "--out", str(out), "--trials", "6", "--threads", "1", "--budget", "accuracy_drop<=5"]
    space = root / "space.yaml"
    space.write_text(json.dumps(SPACE.model_dump(mode="json")))
    cmd += ["--space", str(space)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "study.db"
    deadline = time.time() + 240
    while time.time() < deadline:
        if db.exists():
            try:
                if len(_completed(db)) >= 2:
                    break
            except Exception:
                pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _completed(db)
    assert len(before) >= 2, "the search did not finish two candidates before the kill"
    assert not (out / "report.md").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _completed(db)
    assert set(before) <= set(after)  # nothing finished was lost
    assert len(after) == len(set(after))  # nothing was measured twice
    assert len(after) >= 6  # `--trials 6` counts distinct candidates, repeats of finished points do not use it up
    assert (out / "report.md").exists()
    assert param_key({"depth": 2, "heads": 0.0, "ffn": 0.0, "vocab": False, "precision": "fp32"}) in after
