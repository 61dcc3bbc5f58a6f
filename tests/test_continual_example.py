"""examples/continual runs in its quick mode, writes where it is told, and GEM forgets less.

The quick mode learns 3 permuted-digits tasks (600 images each, one seed) with every
learner; it takes a few seconds on one thread.
"""

import json
import runpy
import sys

from tests.encoders import one_thread

METHODS = ["sgd", "gem", "gem-margin0", "agem", "original"]


def test_quick_run_writes_its_results_and_gem_keeps_the_earlier_tasks(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["examples.continual", "--quick", "--out", str(out)])
    with one_thread():
        runpy.run_module("examples.continual", run_name="__main__")
    assert "wrote results.json" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.json", "table.md"]
    result = json.loads((out / "results.json").read_text())
    summary = result["summary"]
    assert list(summary) == METHODS and result["config"]["tasks"] == 3
    for run in result["runs"]:
        R = run["accuracy"]
        assert len(R) == 3 and all(len(row) == 3 for row in R)
        assert all(0 <= a <= 1 for row in R for a in row)
        assert run["steps"] == 3 * 600 // 10
    # Every learner learns, and the memory-based ones forget less than plain SGD.
    assert all(summary[m]["accuracy"][-1][-1] > 0.5 for m in METHODS)
    for method in ("gem", "gem-margin0", "agem", "original"):
        assert summary[method]["BWT"] >= summary["sgd"]["BWT"], method
    assert summary["gem"]["ACC"] > summary["sgd"]["ACC"] + 0.05
    # The library's projections keep every constraint (cosine ⟨x, g_k⟩ ≥ 0 to rounding),
    # and they did project.
    for method in ("gem", "gem-margin0", "agem"):
        assert summary[method]["worst_cosine_after"] >= -1e-5, method
        assert all(run["projected"] > 0 for run in result["runs"] if run["method"] == method)
    # With the same margin, the library and the original code (ridge 1e-3) agree closely.
    assert abs(summary["gem"]["ACC"] - summary["original"]["ACC"]) < 0.05
