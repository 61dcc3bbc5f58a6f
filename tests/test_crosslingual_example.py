"""examples/crosslingual runs in its quick mode, writes its JSON and plot, and GEM forgets less.

The quick mode fine-tunes the shipped tiny multilingual BERT for 20 steps on small
synthetic data; this runs it for naive fine-tuning and GEM with the MLM constraint only.
"""

import json
import math
import runpy
import sys

import pytest

from tests.encoders import one_thread

LANGUAGES = ["a", "b", "c", "d"]
METHODS = ["naive", "gem-mlm"]


@pytest.mark.slow
def test_quick_run_writes_its_results_and_gem_keeps_the_mlm_loss_lower(
    tmp_path, capsys, monkeypatch
):
    out, plot = tmp_path / "crosslingual.json", tmp_path / "crosslingual.png"
    arguments = ["--quick", "--methods", *METHODS, "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["examples.crosslingual", *arguments])
    with one_thread():
        runpy.run_module("examples.crosslingual", run_name="__main__")
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert set(result) == {"config", "pretrained", "runs", "summary", "wall_seconds", "cpu_seconds"}
    assert result["config"]["quick"] and result["config"]["steps"] == 20
    assert list(result["pretrained"]["mlm_loss"]) == LANGUAGES
    assert list(result["pretrained"]["xsr_p1"]) == LANGUAGES[1:]
    assert [(run["method"], run["seed"]) for run in result["runs"]] == [(m, 0) for m in METHODS]
    for run in result["runs"]:
        assert run["sources"] == ["a"]
        assert list(run["accuracy"]) == LANGUAGES
        assert all(0 <= value <= 1 for value in run["accuracy"].values())
        assert all(0 <= value <= 1 for value in run["xsr_p1"].values())
        assert all(math.isfinite(value) for value in run["mlm_loss"].values())
        assert len(run["memory_batch_deltas"]) == 20
    assert list(result["summary"]) == METHODS
    for method in METHODS:
        assert f"| {method} |" in printed
        summary = result["summary"][method]
        assert summary["source_accuracy"][1] == 0  # one seed: no spread
        assert list(summary["zero_shot"]) == LANGUAGES[1:]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    naive, gem = (result["summary"][m] for m in METHODS)
    # On held-out text, GEM's MLM loss rises less than naive fine-tuning's (it may fall) …
    assert gem["mlm_loss_increase"][0] < naive["mlm_loss_increase"][0]
    assert naive["mlm_loss_increase"][0] > 0
    # … and on the memory batches it was constrained on, it did not rise over the run.
    assert gem["memory_batch_delta_sum"][0] <= 0 < naive["memory_batch_delta_sum"][0]
    gem_run = result["runs"][1]
    assert gem_run["projected_steps"] > 0 and gem_run["min_dot_after"] >= 0


@pytest.mark.slow
def test_real_data_files_and_a_model_path_run_the_same_loop(tmp_path, capsys, monkeypatch):
    from gradsurgery.data import sample_file

    out = tmp_path / "crosslingual.json"
    pos, memory = sample_file("en_pos.conllu"), sample_file("memory.en")
    parallel = ",".join(str(sample_file(f"parallel.{x}")) for x in ("en", "de", "en-de.align"))
    arguments = ["--model", "examples/crosslingual/tiny-mbert", "--train", f"en={pos}"]
    arguments += [
        "--test",
        f"en={pos}",
        "--test",
        f"de={pos}",
        "--memory",
        str(memory),
        "--parallel",
        f"de={parallel}",
    ]
    arguments += ["--methods", "naive", "gem-both", "lfmlf-2src", "--steps", "2"]
    arguments += ["--seeds", "0", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["examples.crosslingual", *arguments])
    with one_thread():
        runpy.run_module("examples.crosslingual", run_name="__main__")
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())

    assert "left out ['lfmlf-2src']: they need two --train languages" in printed
    assert list(result["summary"]) == ["naive", "gem-both"]
    assert list(result["pretrained"]["mlm_loss"]) == ["en"]
    assert list(result["pretrained"]["xsr_p1"]) == ["de"]
    assert [len(run["memory_batch_deltas"]) for run in result["runs"]] == [2, 2]


def test_only_a_full_run_may_write_the_docs_results(monkeypatch, capsys):
    """Regression (issue 14): ``--quick`` overwrote docs/crosslingual.json with one seed."""
    for partial in (["--quick"], ["--seeds", "0"], ["--steps", "5"], ["--methods", "naive"]):
        monkeypatch.setattr(sys, "argv", ["examples.crosslingual", "--docs", *partial])
        with pytest.raises(SystemExit):
            runpy.run_module("examples.crosslingual", run_name="__main__")
        assert "--docs regenerates the documentation's full run" in capsys.readouterr().err


def test_the_default_output_is_not_the_docs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["examples.crosslingual", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_module("examples.crosslingual", run_name="__main__")
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: results/crosslingual)" in shown and "(default: 0.0005)" in shown
