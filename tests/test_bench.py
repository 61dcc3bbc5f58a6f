"""``python -m gradsurgery.bench`` runs end to end on the CPU and records what it promises."""

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gradsurgery.bench import main, report, timing
from gradsurgery.bench.workload import PRESETS, bert_like_params, parse_size

TINY = ["--device", "cpu", "--params", "2e4", "--repeat", "2", "--warmup", "0", "--quiet"]
PARTS = ("total", "gram", "solve", "apply")


def check_times(entry):
    assert entry["median_s"] >= 0 and entry["min_s"] >= 0
    assert entry["min_s"] <= entry["q1_s"] <= entry["median_s"] <= entry["q3_s"] <= entry["max_s"]
    assert len(entry["samples"]) == 2


def test_end_to_end_schema_times_syncs_and_peers(tmp_path: Path):
    out = tmp_path / "run"
    args = [*TINY, "--t", "1", "2", "--methods", "gem", "agem", "pcgrad", "mgda", "lfmlf"]
    doc = main([*args, "phased", "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text()) == doc
    assert out.with_suffix(".png").stat().st_size > 0
    (run,) = doc["runs"]
    assert {"device", "device_name", "date", "torch", "gradsurgery", "peers"} <= set(run["machine"])
    assert [(r["p"], r["dtype"], r["t"]) for r in doc["results"]] == [
        (20000, "fp32", 1),
        (20000, "fp32", 2),
    ]
    one, two = doc["results"]
    assert one["methods"]["pcgrad"] == {"skipped": "combines T ≥ 2 objectives"}
    assert "phased" in one["methods"] and "phased" not in two["methods"]  # once per size
    for method in ("gem", "agem", "pcgrad", "mgda", "lfmlf"):
        entry = two["methods"][method]
        for part in PARTS:
            check_times(entry[part])
        assert entry["floor_s"] > 0 and entry["ratio_to_floor"] > 0
        assert entry["extra_memory_bytes"] >= 2 * 20000 * 4
    for method in ("gem", "agem", "pcgrad", "mgda"):
        assert two["methods"][method]["host_syncs"] == 0, method
    assert two["methods"]["lfmlf"]["host_syncs"] > 0  # its QP is solved on the host
    check_times(one["methods"]["phased"]["inner_step"])
    for name in ("published GEM", "LibMTL PCGrad", "S&K MGDA"):  # quadprog is in [test]
        assert two["peers"][name]["relative_difference"] < 1e-4, name
    table = out.with_suffix(".md").read_text()
    assert "| 2e4 | fp32 | 2 | gem |" in table and "| 2e4 | fp32 | 2 | published GEM |" in table


def test_torchjd_peers_agree(tmp_path: Path):
    pytest.importorskip(
        "torchjd", reason="TorchJD comes with the bench extra: pip install -e '.[bench]'"
    )
    doc = main([*TINY, "--t", "2", "--methods", "gem", "pcgrad", "mgda"])
    (result,) = doc["results"]
    assert result["peers"]["TorchJD PCGrad"]["relative_difference"] < 1e-4
    assert result["peers"]["TorchJD DualProj"]["relative_difference"] < 1e-2
    check_times(result["peers"]["TorchJD MGDA"]["total"])


def test_absent_peers_are_skipped_with_a_message(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchjd", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "quadprog", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    doc = main([*TINY, "--t", "2", "--methods", "gem", "mgda", "--dtype", "bf16"])
    (result,) = doc["results"]
    for name in ("published GEM", "TorchJD DualProj", "TorchJD MGDA"):
        assert "not installed" in result["peers"][name]["skipped"]
        assert "pip install" in result["peers"][name]["skipped"]
    check_times(result["peers"]["S&K MGDA"]["total"])
    check_times(result["methods"]["gem"]["total"])


def test_render_merges_runs(tmp_path: Path):
    doc = main([*TINY, "--t", "2", "--methods", "uniform", "--no-peers"])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    merged = main(["--render", str(path), str(path)])
    assert len(merged["runs"]) == 2
    assert [r["run"] for r in merged["results"]] == [0, 1]
    assert merged["results"][1]["methods"] == doc["results"][0]["methods"]


def test_uniform_has_no_gram_part_and_its_own_floor():
    doc = main([*TINY, "--t", "3", "--methods", "uniform", "mgda", "--no-peers"])
    (result,) = doc["results"]
    uniform, mgda = result["methods"]["uniform"], result["methods"]["mgda"]
    assert "gram" not in uniform and "gram" in mgda
    for part in ("total", "solve", "apply"):
        check_times(uniform[part])
    assert uniform["floor_values_per_parameter"] == 3 + 1  # read the rows once, write d
    assert mgda["floor_values_per_parameter"] == 2 * 3 + 1
    row = next(line for line in report.markdown(doc).splitlines() if "| uniform |" in line)
    assert row.split(" | ")[8] == "none"  # the Gram column


def test_sizes_and_parameters():
    assert parse_size("mbert") == ("mbert", PRESETS["mbert"])
    assert parse_size("1e8") == ("1e8", 100_000_000)
    with pytest.raises(ValueError, match="positive number"):
        parse_size("bert-huge")
    for p in (1, 777, 20_000, 3_000_000):
        named = bert_like_params(p, torch.device("cpu"), torch.float32)
        assert sum(q.numel() for _, q in named) == p
    with pytest.raises(SystemExit):
        main(["--params", "0", "--quiet"])


def test_clock_choices_are_checked():
    with pytest.raises(ValueError, match="clock must be one of"):
        timing.use_clock("sundial")
    if torch.get_num_threads() > 1:
        with pytest.raises(ValueError, match="one torch thread"):
            timing.use_clock("thread")


def test_the_profiler_prints_nothing_between_the_bar_and_the_tables(capfd):
    """Regression (issue 14): USDT and gpuGetDeviceCount lines from the profiler's C++ side."""
    main([*TINY, "--t", "2", "--methods", "gem", "--no-peers"])
    err = capfd.readouterr().err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err


def clean_entry(median: float = 1e-3) -> dict[str, Any]:
    def times(m: float) -> dict[str, float]:
        return {"median_s": m, "q1_s": 0.95 * m, "q3_s": 1.05 * m}

    return {
        "total": times(median),
        **{part: times(median / 4) for part in ("gram", "solve", "apply")},
        "ratio_to_floor": 3.0,
    }


def bench_doc(load: float, clock: str = "wall", **entry: dict[str, Any]) -> dict[str, Any]:
    machine = {"load_average": load, "cores": 2}
    return {
        "runs": [{"machine": machine, "settings": {"clock": clock}}],
        "results": [{"size": "2e4", "dtype": "fp32", "t": 2, "methods": entry}],
    }


def test_a_measurement_that_contradicts_itself_is_warned_about():
    assert report.problems(bench_doc(1.0, gem=clean_entry())) == []
    noisy = clean_entry()
    noisy["total"] = {"median_s": 1e-3, "q1_s": 0.2e-3, "q3_s": 5.12e-3}  # as reported
    slow_part = clean_entry()
    slow_part["solve"]["median_s"] = 2e-3  # a part slower than the whole
    below = {**clean_entry(), "ratio_to_floor": 0.4}
    found = report.problems(bench_doc(6.5, gem=noisy, mgda=slow_part, pcgrad=below))
    assert len(found) == 4
    assert "load average was 6.5 on 2 cores" in found[0] and "--clock thread" in found[0]
    assert "gem 2e4 fp32 t=2: spread ±246 %" in found[1]
    assert "mgda 2e4 fp32 t=2: its solve (2.00 ms) took longer than the whole" in found[2]
    assert "pcgrad 2e4 fp32 t=2: 0.40× the floor" in found[3]
    # the thread clock does not count waiting for a core: a busy machine is no problem then
    assert report.problems(bench_doc(6.5, "thread", gem=clean_entry())) == []
    # Uniform's apply part is all of its surgery: its noise is no contradiction
    whole_apply = clean_entry()
    whole_apply["apply"]["median_s"] = 1.04 * whole_apply["total"]["q3_s"]
    assert report.problems(bench_doc(1.0, "thread", uniform=whole_apply)) == []


def test_a_floor_whose_bandwidth_drifts_is_warned_about():
    steady = {**clean_entry(), "floor_samples": [1.0, 1.02, 0.98], "bandwidth_GBps": 18.0}
    assert report.problems(bench_doc(1.0, gem=steady, mgda=steady)) == []
    shaky = {**steady, "floor_samples": [1.0, 2.0, 0.5, 2.2, 0.4]}
    slower = {**steady, "bandwidth_GBps": 7.7}
    found = report.problems(bench_doc(1.0, gem=shaky, mgda=slower))
    assert len(found) == 2
    assert "gem 2e4 fp32 t=2: the floor's samples spread ±" in found[0]
    assert "bandwidth changed while timing" in found[0]
    assert "2e4 fp32: the memory bandwidth drifted from 18.0 GB/s (gem t=2) to 7.7" in found[1]
    # runs recorded before the in-place addition joined the floor still render
    old = {**steady, "copy_bandwidth_GBps": 7.7}
    del old["bandwidth_GBps"]
    assert "drifted from 18.0 GB/s" in report.problems(bench_doc(1.0, gem=steady, mgda=old))[0]


def test_the_floor_takes_the_faster_of_a_copy_and_an_in_place_addition(monkeypatch):
    # per sample: the surgery, then a copy (2 values per element), then an addition (3)
    for copy, add, per_value in ((6.0, 12.0, 3.0), (6.0, 6.0, 2.0)):
        times = iter([1.0, copy, add] * 2)
        monkeypatch.setattr(timing, "measure", lambda fn, device, times=times: next(times))
        timed, rate = timing.interleaved(lambda: None, torch.ones(2), torch.device("cpu"), 1, 1)
        assert timed == [1.0] and rate == [per_value / 2]


def test_the_printed_tables_start_with_the_warnings(capsys):
    doc = main([*TINY, "--t", "2", "--methods", "gem", "--no-peers"])
    printed = capsys.readouterr().out
    found = report.problems(doc)
    assert ("not a valid measurement" in printed) == bool(found)
    for problem in found:
        assert problem in printed


def test_help_shows_the_defaults_and_what_render_does(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "timed samples per figure (default: 5)" in shown
    assert "--clock {wall,thread}" in shown and "(default: wall)" in shown
    assert "--render JSON [JSON ...] measure nothing: merge the OUT.json of earlier runs" in shown
