import json

import pytest
from typer.testing import CliRunner

from slimformer import models
from slimformer.cli import app, main
from slimformer.testing import tiny_bert, write_sst2_folder

runner = CliRunner()


def run_main(monkeypatch, capsys, *args):
    """Run the real entry point (with its error handling) and return (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.argv", ["slimformer", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture
def tiny_folder(tmp_path):
    return models.save(tiny_bert(), tmp_path / "tiny")


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("finetune", "evaluate", "measure"):
        assert cmd in result.output


def test_finetune_evaluate_measure_round_trip(tmp_path, tiny_folder, monkeypatch, capsys):
    data = write_sst2_folder(tmp_path / "sst")
    out = tmp_path / "ft"
    code, stdout, _ = run_main(monkeypatch, capsys, "finetune", "--model", str(tiny_folder), "--data", str(data),
                               "--out", str(out), "--epochs", "1", "--precision", "fp32", "--json")
    assert code in (0, None)
    result = json.loads(stdout)
    assert result["quality"]["metric"] == "accuracy" and (out / "model.safetensors").exists()
    assert not (tmp_path / ".ft.work").exists()  # checkpoints cleaned once the result is saved
    code, stdout, _ = run_main(monkeypatch, capsys, "evaluate", "--model", str(out), "--data", str(data), "--json")
    assert json.loads(stdout)["quality"]["value"] == result["quality"]["value"]
    code, stdout, _ = run_main(monkeypatch, capsys, "measure", "--model", str(out), "--batch", "1", "--seq", "16",
                               "--threads", "1", "--runs", "30", "--json")
    card = json.loads(stdout)
    assert card["latency_ms_p50"] > 0 and card["size_bytes"] == (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t, m: ["evaluate", "--model", str(t / "missing"), "--data", str(t / "sst")], "does not exist"),
        (lambda t, m: ["evaluate", "--model", "minlm", "--data", str(t / "sst")], "unknown model short name"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "nodata")], "data path"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "sst"), "--task", "nonsense"], "unknown task"),
        (lambda t, m: ["finetune", "--model", str(m), "--data", str(t / "sst"), "--out", str(t / "afile")],
         "is an existing file"),
        (lambda t, m: ["finetune", "--model", str(m), "--data", str(t / "sst"), "--out", str(t / "o"), "--lr", "5"],
         "invalid setting learning_rate"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "sst"), "--labels", "a,b,c"],
         "outside the declared set"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "ner"), "--task", "token-classification"],
         "was trained for sequence-classification"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "three")], "has a head for 2 labels"),
        (lambda t, m: ["evaluate", "--model", str(m), "--data", str(t / "sst"), "--tuning-split", "dev"],
         "the dev file is the eval split here"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, tiny_folder, monkeypatch, capsys, make_args, message):
    write_sst2_folder(tmp_path / "sst")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t1\nc\t2\nd\t0\n")
    (tmp_path / "ner").mkdir()
    (tmp_path / "ner" / "train.txt").write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n")
    code, _, err = run_main(monkeypatch, capsys, *make_args(tmp_path, tiny_folder))
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "o").exists()


def test_distill_with_augmented_transfer_text(tmp_path, tiny_folder, monkeypatch, capsys):
    data = write_sst2_folder(tmp_path / "sst")
    out = tmp_path / "kd"
    code, stdout, _ = run_main(monkeypatch, capsys, "distill", "--teacher", str(tiny_folder), "--data", str(data),
                               "--out", str(out), "--layers", "1", "--epochs", "1", "--augment", "1",
                               "--precision", "fp32", "--json")
    assert code in (0, None)
    history = json.loads((out / "slimformer.json").read_text())["history"]
    kd = next(h for h in history if h["stage"] == "distill")
    assert kd["settings"]["augment"] == 1 and kd["results"]["transfer_examples"] > 0
