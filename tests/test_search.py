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
    lo, hi = conf["quality_drop_on_eval_ci95"]  # paired over the eval examples; per-example results not kept
    assert lo <= conf["quality_drop_on_eval"] <= hi and "units" not in conf["chosen"]
    for f in ("report.md", "report.html", "pareto.png", "summary.json", "best/README.md", "best/slimformer.json"):
        assert (root / "out" / f).exists(), f
    assert "data:image/png;base64," in (root / "out" / "report.html").read_text()
    # The fp32 reference is the baseline itself: measured once, so its speed-up is exactly 1.
    base = next(c for c in summary["candidates"] if c["name"] == "d2-h0-f0-v0-fp32")
    assert base["measurements"]["speedup"]["value"] == 1.0
    # The three compared models are re-timed side by side at the end, each once per round, and reported.
    timing = conf["timing"]
    assert timing["rounds"] == 3 and set(timing["latency_ms"]) == {"baseline", "ort_int8_baseline", "chosen"}
    assert all(len(v) == 3 and min(v) > 0 for v in timing["latency_ms"].values())
    assert timing["speedup"]["baseline"] == 1.0
    assert timing["speedup"]["chosen"] == pytest.approx(
        timing["latency_ms_median"]["baseline"] / timing["latency_ms_median"]["chosen"])
    report = (root / "out" / "report.md").read_text()
    assert "speed-up, side by side" in report and f"{timing['speedup']['chosen']:.2f}x" in report
    assert "re-timed side by side" in (root / "out" / "best" / "README.md").read_text()


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
                if len(_completed(db)) >= 2 and (out / "elapsed.json").exists():
                    break
            except Exception:
                pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _completed(db)
    assert len(before) >= 2, "the search did not finish two candidates before the kill"
    spent = json.loads((out / "elapsed.json").read_text())["seconds"]  # written before each trial
    assert not (out / "report.md").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _completed(db)
    # The lists go with each check: this test failed once under load, and its message said too little.
    assert set(before) <= set(after), (before, after)  # nothing finished was lost
    assert len(after) == len(set(after)), after  # nothing was measured twice
    assert len(after) >= 6, after  # `--trials 6` counts distinct candidates; repeats of finished points do not
    assert (out / "report.md").exists(), done.stdout[-2000:]
    # The summary counts both runs' time, not only the second's.
    assert json.loads((out / "summary.json").read_text())["seconds"] > spent > 0
    assert param_key({"depth": 2, "heads": 0.0, "ffn": 0.0, "vocab": False, "precision": "fp32"}) in after


# Given students: one depth of the teacher's tokens and labels; a space that measures every point of it.
STUDENT_SPACE = SearchSpace(depths=[2], heads=[0.0], ffn=[0.0], vocab=[False], precisions=["fp32", "ort-dynamic-int8"])


def _student(teacher: models.SlimModel, layers: list[int], out: Path) -> Path:
    from slimformer.stages.distill import make_student

    return models.save(make_student(teacher, layers), out)


def test_given_student_is_used_instead_of_distilling_one(setup):
    from slimformer.evaluate import evaluate
    from slimformer.export import load_runner

    root, teacher, data = setup
    task = load_task_data(data)
    student = _student(models.load(teacher), [1], root / "given-d1")
    files_before = sorted(p.name for p in student.iterdir())
    cfg = SearchConfig(trials=4, threads=1, space=STUDENT_SPACE, strategy="grid", fresh_process_measurement=False,
                       budget="quality_drop<=100", students=[str(student)])
    out = root / "with-student"
    summary = run_search(str(teacher), task, cfg, out, progress=False)
    assert not (out / "cache" / "student-d1").exists()  # nothing distilled: the given student stands in
    d1 = [c for c in summary["candidates"] if c["params"]["depth"] == 1]  # depth 1 searched though not in depths
    assert {c["name"] for c in d1} == {"d1-h0-f0-v0-fp32", "d1-h0-f0-v0-ort-dynamic-int8"}
    assert all(c["params"]["student"] == str(student) for c in d1)
    runner, tok = load_runner(student, task, threads=1)
    expected = evaluate(runner, tok, task, "tuning")["value"]
    fp32 = next(c for c in d1 if c["params"]["precision"] == "fp32")
    assert fp32["path"] == str(student) and fp32["measurements"]["quality"]["value"] == expected
    assert sorted(p.name for p in student.iterdir()) == files_before  # the user's folder is only read
    assert summary["students"] == {"1": str(student)}
    report = (out / "report.md").read_text()
    assert f"depth 1 `{student}`" in report and f"--student {student}" in report
    # The same folder resumed with other students would mix their cached numbers: refused.
    with pytest.raises(SlimformerError, match="holds a search with other students"):
        run_search(str(teacher), task, SearchConfig(space=STUDENT_SPACE, fresh_process_measurement=False), out,
                   progress=False)
    # ... and so would other recovery or measurement settings: its pruned models are cached by shape only.
    other = cfg.model_copy(update={"space": STUDENT_SPACE.model_copy(update={"recovery_epochs": 2.0}), "runs": 40})
    with pytest.raises(SlimformerError, match=r"other settings \(recovery_epochs 1.0 -> 2.0; runs 30 -> 40\)"):
        run_search(str(teacher), task, other, out, progress=False)


def test_bad_given_students(setup):
    from slimformer.testing import minilm_tokenizer

    root, teacher, data = setup
    task = load_task_data(data)
    slim = models.load(teacher)
    bad = root / "bad-students"

    def search_with(*students: Path, match: str) -> None:
        cfg = SearchConfig(space=STUDENT_SPACE, fresh_process_measurement=False, students=[str(s) for s in students])
        with pytest.raises(SlimformerError, match=match) as e:
            run_search(str(teacher), task, cfg, bad / "out", progress=False)
        assert "\n" not in str(e.value)

    search_with(bad / "missing", match="does not exist")
    search_with(teacher, match="has 2 layers, the teacher 2; give a student with fewer layers")
    a, b = _student(slim, [0], bad / "a"), _student(slim, [1], bad / "b")
    search_with(a, b, match="both have depth 1; give one student per depth")
    # The CLI passes every --student on.
    from typer.testing import CliRunner

    from slimformer.cli import app

    r = CliRunner().invoke(app, ["search", "--model", str(teacher), "--data", str(data), "--out", str(bad / "out"),
                                 "--student", str(a), "--student", str(b)])
    assert isinstance(r.exception, SlimformerError) and "both have depth 1" in str(r.exception)
    other_labels = tiny_bert(label_names=["neg", "pos"], num_hidden_layers=2)
    search_with(_student(other_labels, [0], bad / "labels"), match=r"predicts labels \['neg', 'pos'\]")
    other_vocab = _student(slim, [0], bad / "vocab-src")
    student = models.load(other_vocab)
    student.tokenizer = minilm_tokenizer()
    student.tokenizer.add_tokens(["zzqxword"])
    search_with(models.save(student, bad / "vocab"), match="another tokenizer vocabulary than the teacher")
    assert not (bad / "out" / "search.json").exists()  # every check runs before any work


def test_a_drop_of_exactly_the_budget_is_within_it():
    from slimformer.pareto import parse_budget, within_budget
    from slimformer.search import make_candidate
    from slimformer.tasks import TaskType

    card = {"latency_ms_p50": 5.0, "latency_ms_p95": 6.0, "runs": 30, "throughput_batch_per_s": 10.0,
            "size_bytes": 1_000_000, "peak_rss_mb": 100.0}
    baseline = {"quality": {"value": 0.952}, "cost": {**card, "latency_ms_p50": 50.0, "size_bytes": 90_000_000}}
    # 100 * (0.952 - 0.942) is 1.0000000000000009 in floating point.
    edge = make_candidate("edge", {}, Path("x"), {"value": 0.942, "n": 2000}, card, baseline,
                          TaskType.SEQUENCE_CLASSIFICATION)
    assert edge.value("accuracy_drop") == 1.0
    assert within_budget(edge, parse_budget("accuracy_drop<=1.0"))
    over = make_candidate("over", {}, Path("x"), {"value": 0.9415, "n": 2000}, card, baseline,
                          TaskType.SEQUENCE_CLASSIFICATION)
    assert not within_budget(over, parse_budget("accuracy_drop<=1.0"))


def test_with_a_confidence_the_budget_holds_on_the_paired_bound_of_the_drop(tmp_path):
    from types import SimpleNamespace

    from slimformer.pareto import choose, parse_budget
    from slimformer.search import bounded_budget, make_candidate, with_drop_bounds
    from slimformer.tasks import TaskType

    card = {"latency_ms_p50": 5.0, "latency_ms_p95": 6.0, "runs": 30, "throughput_batch_per_s": 10.0,
            "size_bytes": 1_000_000, "peak_rss_mb": 100.0}
    base_units = [1] * 440 + [0] * 60  # 0.88 on 500 tuning examples
    baseline = {"quality": {"value": 0.88}, "cost": {**card, "latency_ms_p50": 50.0, "size_bytes": 90_000_000}}
    # Both lose 0.8 points. "steady" differs from the baseline on 4 answers; "shaky" on 44 (20 won, 24 lost).
    steady = [1] * 436 + [0] * 64
    shaky = [1] * 416 + [0] * 24 + [1] * 20 + [0] * 40
    units = tmp_path / "units"
    units.mkdir()
    for name, u in (("baseline", base_units), ("steady", steady), ("shaky", shaky)):
        (units / f"{name}.json").write_text(json.dumps(u))
    teacher = tmp_path / "teacher"
    cands = [make_candidate(name, {}, tmp_path / name, {"value": sum(u) / 500, "n": 500},
                            {**card, "latency_ms_p50": t}, baseline, TaskType.SEQUENCE_CLASSIFICATION)
             for name, u, t in (("steady", steady, 8.0), ("shaky", shaky, 4.0))]
    budget = parse_budget("accuracy_drop<=2.0")
    assert choose(cands, bounded_budget(budget, None), "latency_ms").name == "shaky"  # on the measured drop
    bounded = with_drop_bounds(cands, tmp_path, SimpleNamespace(type=TaskType.SEQUENCE_CLASSIFICATION), teacher,
                               0.9, 1, log=lambda m: None)
    bound = {c.name: c.value("accuracy_drop_upper") for c in bounded}
    # Resampled, steady loses about 4 +- 2 answers (90% bound ~1.4 points), shaky 4 +- 6.6 (~2.5 points).
    assert 0.8 < bound["steady"] < 1.8 and bound["shaky"] > 2.0
    assert [str(k) for k in bounded_budget(budget, 0.9)] == ["accuracy_drop_upper<=2"]
    assert choose(bounded, bounded_budget(budget, 0.9), "latency_ms").name == "steady"


def test_seeds_sit_at_the_given_students_depths():
    from slimformer.search import seed_params

    space = SearchSpace(heads=[0.0, 0.5], ffn=[0.0, 0.75], precisions=["fp32", "ort-dynamic-int8",
                                                                        "ort-dynamic-int8-emb4"])
    assert {p["depth"] for p in seed_params(space, 6)} == {3}  # no students: the middle of 6, 4, 3, 2
    seeds = seed_params(space, 6, [4, 3])
    precs = ["ort-dynamic-int8", "ort-dynamic-int8-emb4"]
    assert [(p["depth"], p["precision"]) for p in seeds] == [(d, q) for d in (3, 4) for q in precs] * 2
    # The unpruned students come first (cheap, and the safest under a quality budget), then the most pruned.
    assert all(p["heads"] == 0.0 and p["ffn"] == 0.0 and not p["vocab"] for p in seeds[:4])
    assert all(p["heads"] == 0.5 and p["ffn"] == 0.75 and p["vocab"] for p in seeds[4:])
    # A space with one cut only seeds it once.
    flat = SearchSpace(heads=[0.25], ffn=[0.5], vocab=[True], precisions=["ort-dynamic-int8"])
    assert seed_params(flat, 6, [3]) == [{"depth": 3, "heads": 0.25, "ffn": 0.5, "vocab": True,
                                          "precision": "ort-dynamic-int8"}]


def test_model_trained_with_another_tuning_split_is_refused(setup):
    from slimformer.search import given_students, prepare_teacher

    root, teacher, data = setup
    task = load_task_data(data)
    here = root / "fingerprints"
    notes: list[str] = []
    # A model from before the fingerprint (no data.tuning_fingerprint): let through, with a note.
    assert "tuning_fingerprint" not in (models.read_record(teacher).get("data") or {})
    assert prepare_teacher(str(teacher), task, SearchConfig(), here / "a", False, log=notes.append) == teacher
    assert len(notes) == 1 and "no tuning-split fingerprint" in notes[0]
    assert prepare_teacher(str(teacher), task, SearchConfig(), here / "a", False) == teacher  # no log: silent
    # Trained with this tuning split: used as it is, nothing to say.
    same = models.save(models.load(teacher), here / "same")
    models.update_record(same, data={"tuning_fingerprint": task.tuning_fingerprint()})
    notes.clear()
    assert prepare_teacher(str(same), task, SearchConfig(), here / "b", False, log=notes.append) == same
    assert not notes
    # Trained with another tuning split (another seed here): refused before any work, as teacher or student.
    other = load_task_data(data, seed=1)
    assert other.tuning_fingerprint() != task.tuning_fingerprint()
    stale = models.save(models.load(teacher), here / "stale")
    models.update_record(stale, data={"tuning_fingerprint": other.tuning_fingerprint()})
    with pytest.raises(SlimformerError, match="was trained with another tuning split") as e:
        run_search(str(stale), task, SearchConfig(space=STUDENT_SPACE, fresh_process_measurement=False),
                   here / "out", progress=False)
    assert "\n" not in str(e.value) and "fine-tune / distil it again" in str(e.value)
    student = _student(models.load(teacher), [0], here / "student")
    models.update_record(student, data={"tuning_fingerprint": other.tuning_fingerprint()})
    cfg = SearchConfig(space=STUDENT_SPACE, fresh_process_measurement=False, students=[str(student)])
    with pytest.raises(SlimformerError, match=f"student {student} was trained with another tuning split"):
        run_search(str(same), task, cfg, here / "out", progress=False)
    assert not (here / "out" / "search.json").exists()
    assert given_students(cfg, models.load(same)) == {1: student}  # without a task there is nothing to compare


def test_recovery_settings_reach_the_pruning_of_a_candidate(setup, monkeypatch):
    import slimformer.stages.prune as prune_stage
    from slimformer.search import Builder

    root, teacher, data = setup
    task = load_task_data(data)
    seen = []
    monkeypatch.setattr(prune_stage, "prune", lambda slim, task, cfg, work, **kw: seen.append(cfg))
    space = SPACE.model_copy(update={"recovery_augment": 2, "recovery_epochs": 3, "recovery_max_examples": 40})
    builder = Builder(root / "recovery-knobs", teacher, task, SearchConfig(space=space), progress=False)
    builder.pruned(2, 0.5, 0.0, False)
    builder.pruned(2, 0.0, 0.0, True)  # vocabulary only: nothing to recover
    structural, vocab_only = seen
    assert (structural.kd_augment, structural.epochs, structural.max_train_examples) == (2, 3, 40)
    assert structural.recover == "kd" and structural.kd_cache_teacher
    assert vocab_only.recover == "none" and not vocab_only.kd_cache_teacher


def test_space_from_yaml_reads_settings_and_names_bad_ones(tmp_path):
    good = tmp_path / "space.yaml"
    good.write_text("depths: [3]\nrecovery_epochs: 2\nprecisions: [ort-dynamic-int8]\n")
    space = SearchSpace.from_yaml(good)
    assert space.depths == [3] and space.recovery_epochs == 2 and space.precisions == ["ort-dynamic-int8"]
    cases = {"missing.yaml": None, "syntax.yaml": "depths: [3\n", "list.yaml": "- 3\n",
             "unknown.yaml": "depthz: [3]\n", "range.yaml": "recovery_epochs: 0\n"}
    messages = {"missing.yaml": "does not exist", "syntax.yaml": "not valid YAML", "list.yaml": "must hold a mapping",
                "unknown.yaml": "depthz", "range.yaml": "recovery_epochs=0"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(SlimformerError, match=messages[name]):
            SearchSpace.from_yaml(tmp_path / name)


def test_a_narrow_space_without_the_references_values_still_compares_with_them(setup):
    """The references (fp32 teacher, its ORT int8) are measured even when the space leaves out the teacher's
    depth, unpruned widths and fp32: the sampler only ever draws from the space."""
    root, teacher, data = setup
    task = load_task_data(data)
    narrow = SearchSpace(**{**SPACE.model_dump(), "depths": [1], "heads": [0.5], "ffn": [0.0], "vocab": [True],
                            "precisions": ["ort-dynamic-int8"]})
    cfg = SearchConfig(trials=30, threads=1, space=narrow, fresh_process_measurement=False, budget="quality_drop<=100")
    summary = run_search(str(teacher), task, cfg, root / "narrow", progress=False)
    names = sorted(c["name"] for c in summary["candidates"])
    # The whole space is one point; with the two references that is all there is to measure.
    assert names == ["d1-h0p5-f0-v1-ort-dynamic-int8", "d2-h0-f0-v0-fp32", "d2-h0-f0-v0-ort-dynamic-int8"]
    assert summary["references"] == ["d2-h0-f0-v0-fp32", "d2-h0-f0-v0-ort-dynamic-int8"]
    assert summary["chosen"] is not None


def test_a_sampler_that_keeps_repeating_itself_is_steered_to_unmeasured_points(setup, monkeypatch):
    """A sampler that proposes one measured point forever (TPE comes close on small spaces) would stop the
    search with points untried; after each repeat the search queues an unmeasured point instead."""
    import random

    from slimformer import search
    from slimformer.search import unmeasured_point

    root, teacher, data = setup
    space = SearchSpace(**{**SPACE.model_dump(), "depths": [2], "heads": [0.0], "ffn": [0.0], "vocab": [False, True]})
    stuck = {"depth": 2, "heads": 0.0, "ffn": 0.0, "vocab": False, "precision": "fp32"}  # the fp32 reference
    monkeypatch.setattr(search, "_sampler", lambda *a, **k: optuna.samplers.PartialFixedSampler(
        stuck, optuna.samplers.RandomSampler(seed=0)))
    cfg = SearchConfig(trials=30, threads=1, space=space, fresh_process_measurement=False, budget="quality_drop<=100")
    summary = run_search(str(teacher), load_task_data(data), cfg, root / "stuck", progress=False)
    # Four points: the two references, the seeded vocabulary-pruned int8 and the one only exploration finds.
    assert sorted(c["name"] for c in summary["candidates"]) == [
        "d2-h0-f0-v0-fp32", "d2-h0-f0-v0-ort-dynamic-int8", "d2-h0-f0-v1-fp32", "d2-h0-f0-v1-ort-dynamic-int8"]

    choices = {"depth": [2], "heads": [0.0], "ffn": [0.0, 0.5], "vocab": [True], "precision": ["fp32"]}
    known = {"d2-h0-f0-v1-fp32"}
    assert unmeasured_point(choices, known, random.Random(0)) == {**stuck, "ffn": 0.5, "vocab": True}
    assert unmeasured_point(choices, known | {"d2-h0-f0p5-v1-fp32"}, random.Random(0)) is None


def test_reproduce_command_carries_the_settings_that_change_the_choice():
    import shlex

    from slimformer.report import reproduce_command

    plain = shlex.split(reproduce_command(SearchConfig(), "minilm", "data/sst2", "runs/s"))
    assert "--confidence" not in plain and "--tie-tolerance" not in plain and "--tuning-split" not in plain
    cfg = SearchConfig(confidence=0.9, tie_tolerance=0.0, time_budget_s=1800, students=["runs/kd3"])
    cmd = shlex.split(reproduce_command(cfg, "minilm", "data/sst2", "runs/s", tuning_source="the dev file"))
    for flag, value in (("--confidence", "0.9"), ("--tie-tolerance", "0"), ("--time-budget", "1800s"),
                        ("--student", "runs/kd3"), ("--tuning-split", "dev")):
        assert cmd[cmd.index(flag) + 1] == value
