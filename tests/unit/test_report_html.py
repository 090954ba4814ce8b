"""report.html and its PNG plots (emulator.report.html), and the progress series behind them."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest

from emulator.cli import main as cli_main
from emulator.physics import double_click_model
from emulator.report.html import PLOT_FILES, app_model, link_model, render_run_dir, write_report
from emulator.report.results import write_json_atomic
from emulator.report.series import SeriesRecorder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script>"


def ideal_memory() -> dict[str, Any]:
    return {"qubits": 64, "t1": "inf", "t2": "inf", "gate_fidelity": 1.0}


def make_scenario() -> dict[str, Any]:
    """`scenario_to_dict` form: a chain of four nodes, three kinds of link."""
    return {
        "name": "chain",
        "description": "four nodes <b>in a chain</b>",
        "seed": 1,
        "duration": 10.0,
        "time_scale": 1.0,
        "nodes": {
            "alice": {"role": "endpoint", "external": False, "memory": ideal_memory()},
            "bob": {"role": "repeater", "external": False, "memory": ideal_memory()},
            "carol": {"role": "endpoint", "external": True, "memory": {**ideal_memory(), "t2": 0.5, "t1": 1.0}},
            "dave": {"role": "endpoint", "external": False, "memory": ideal_memory()},
        },
        "links": [
            {"endpoints": ["alice", "bob"], "length_km": 10.0, "attenuation_db_per_km": 0.2,
             "entanglement": {"scheme": "double-click", "detector_efficiency": 0.9, "visibility": 0.95,
                              "bright_state_alpha": None}},
            {"endpoints": ["bob", "carol"], "length_km": 25.0, "attenuation_db_per_km": 0.2,
             "entanglement": {"scheme": "single-click", "detector_efficiency": 0.8, "visibility": 0.9,
                              "bright_state_alpha": 0.1}},
            {"endpoints": ["carol", "dave"], "length_km": 3.5, "attenuation_db_per_km": 0.2, "entanglement": None},
        ],
        "apps": [
            {"kind": "epr-test", "name": "epr-ab", "nodes": ["alice", "bob"], "start": 0.0, "pairs": 1000, "wait": 0.0},
            {"kind": "epr-test", "name": "epr-bc", "nodes": ["bob", "carol"], "start": 0.0, "pairs": 500, "wait": 0.0},
        ],
        "expect": [],
    }  # fmt: skip


def app_entry(nodes: list[str], pairs: int, metrics: dict[str, Any], state: str = "done") -> dict[str, Any]:
    return {
        "kind": "epr-test", "nodes": nodes, "state": state,
        "requested": {"pairs": pairs, "wait_s": 0.0, "start_s": 0.0},
        "started_s": 0.0, "finished_s": 0.2, "error": None, "metrics": metrics,
    }  # fmt: skip


def expectation(index: int, app: str, metric: str, observed: float | None, passed: bool) -> dict[str, Any]:
    return {
        "index": index, "metric": metric, "target": f"app {app}", "app": app, "min": 0.9, "max": None,
        "bound": ">= 0.9", "observed": observed, "passed": passed, "message": f"{metric} of app {app}: checked",
    }  # fmt: skip


def make_results() -> dict[str, Any]:
    """A `results.json` document with series, three apps (one with a hostile name) and expectations."""
    metrics_ab = {"pairs_measured": 1000, "fidelity": 0.955, "fidelity_stderr": 0.02, "chsh": 2.7,
                  "chsh_stderr": 0.13, "pair_rate_hz": 5200.0, "wall_s": 0.2}  # fmt: skip
    metrics_bc = {"pairs_measured": 500, "fidelity": 0.81, "fidelity_stderr": 0.03, "chsh": 2.1,
                  "chsh_stderr": 0.2, "pair_rate_hz": 1800.0, "key_bits": 12}  # fmt: skip
    series = {
        "epr-ab": [{"t_s": 0.04 * k, "pairs_measured": 200 * k} for k in range(6)],
        "epr-bc": [{"t_s": 0.05 * k, "pairs_measured": 100 * k, "fidelity": 0.8} for k in range(6)],
        HOSTILE: [{"t_s": 0.0, "pairs_measured": 0}, {"t_s": 0.1, "pairs_measured": 7}],
    }
    return {
        "schema": 1, "qnetem_version": "0.1.0", "scenario": "chain", "seed": 1, "run_id": "chain-20250101T000000Z",
        "backend": None, "started_at": "2025-01-01T00:00:00.000Z", "finished_at": "2025-01-01T00:00:02.000Z",
        "wall_s": 2.0, "emulated_s": 0.3, "time_scale": 1.0, "status": "failed", "exit_code": 1, "passed": False,
        "error": None,
        "apps": {
            "epr-ab": app_entry(["alice", "bob"], 1000, metrics_ab),
            "epr-bc": app_entry(["bob", "carol"], 500, metrics_bc),
            HOSTILE: app_entry(["alice", "bob"], 10, {}, state="running"),
        },
        "expectations": [
            expectation(0, "epr-ab", "fidelity", 0.955, True),
            expectation(1, "epr-bc", "chsh", 2.1, True),
            expectation(2, HOSTILE, "fidelity", None, False),
        ],
        "stats": {"broker": {"pairs_delivered": {"alice|bob": 1000, "bob|carol": 500}}, "nodes": {}},
        "finish_reason": "duration_elapsed",
        "series": series,
    }  # fmt: skip


def referenced_images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))  # a blank 8x4 inch Agg canvas alone is ~3 kB


# --------------------------------------------------------------------------- the page


def test_report_has_every_app_expectation_and_plot(tmp_path: Path) -> None:
    results, scenario = make_results(), make_scenario()
    path = write_report(tmp_path, results, scenario)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for name in ("epr-ab", "epr-bc", "&lt;script&gt;alert(1)&lt;/script&gt;"):
        assert name in page
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    for e in results["expectations"]:
        row = next(r for r in rows if e["message"].replace("<", "&lt;").replace(">", "&gt;") in r)
        assert ("PASS" if e["passed"] else "FAIL") in row
    assert page.count(">PASS<") == 2  # two expectations held; the run status says FAIL
    assert page.count(">FAIL<") == 2  # one expectation and the run status

    images = referenced_images(page)
    assert sorted(images) == sorted(PLOT_FILES)  # every plot has data here
    for name in images:
        assert_png(tmp_path / name)
    # Self-contained: no script, no external resource.
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page


def test_report_shows_model_values_and_link_stats(tmp_path: Path) -> None:
    page = write_report(tmp_path, make_results(), make_scenario()).read_text(encoding="utf-8")
    # Double-click 10 km link, V = 0.95: F = (1+3V)/4 = 0.9625, p/T = 5215 Hz (scenarios/two-node-epr.yaml header).
    assert "0.9625" in page and "5215" in page
    assert "3.5" in page  # the classical-only link's length
    assert "four nodes &lt;b&gt;in a chain&lt;/b&gt;" in page  # the description is text, not markup
    assert "key_bits = 12" in page  # metrics of other app kinds are listed, not dropped


def test_hostile_strings_are_escaped_everywhere(tmp_path: Path) -> None:
    scenario = make_scenario()
    scenario["name"] = 'x"><img src=x onerror=alert(1)>$\\frac{1'  # odd "$": no mathtext parse either
    scenario["nodes"]["<b>eve</b>"] = {"role": "<i>spy</i>", "external": False, "memory": ideal_memory()}
    results = make_results()
    results["error"] = "<iframe>boom</iframe>"
    results["run_id"] = "$x$ <title>"  # a mathtext-looking label too
    page = write_report(tmp_path, results, scenario).read_text(encoding="utf-8")
    for raw in (HOSTILE, "<b>eve</b>", "<i>spy</i>", "<iframe>", "<img src=x", "<title>$x$"):
        assert raw not in page
    assert "&lt;b&gt;eve&lt;/b&gt;" in page and "&lt;iframe&gt;boom&lt;/iframe&gt;" in page
    for name in referenced_images(page):
        assert_png(tmp_path / name)


def test_missing_series_metrics_and_scenario_still_render(tmp_path: Path) -> None:
    write_report(tmp_path, make_results(), make_scenario())  # first a full report: plots exist
    results = make_results()
    del results["series"]
    for app in results["apps"].values():
        app["metrics"] = {}
    results["expectations"] = []
    page = write_report(tmp_path, results, {}).read_text(encoding="utf-8")
    assert referenced_images(page) == []
    for name in PLOT_FILES:
        assert not (tmp_path / name).exists(), name  # stale plots of the first rendering are gone
    assert "no progress samples" in page and "sets no expectations" in page
    for name in results["apps"]:
        assert name.replace("<", "&lt;").replace(">", "&gt;") in page


def test_minimal_results_render(tmp_path: Path) -> None:
    page = write_report(tmp_path, {}, {}).read_text(encoding="utf-8")
    assert "No apps." in page and referenced_images(page) == []


def test_garbage_values_do_not_break_the_report(tmp_path: Path) -> None:
    results = make_results()
    results["apps"]["epr-ab"]["metrics"].update(fidelity="high", fidelity_stderr=None, chsh=None)
    results["series"]["epr-ab"] = [{"t_s": "soon"}, 3, {"t_s": 0.1, "pairs_measured": None}]
    results["apps"]["epr-bc"]["nodes"] = "bob"
    scenario = make_scenario()
    scenario["links"].append({"endpoints": ["alice"], "length_km": -1})
    page = write_report(tmp_path, results, scenario).read_text(encoding="utf-8")
    for name in referenced_images(page):
        assert_png(tmp_path / name)


def test_render_run_dir_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json_atomic(tmp_path / "results.json", make_results())
    write_json_atomic(tmp_path / "scenario.json", make_scenario())
    assert render_run_dir(tmp_path) == tmp_path / "report.html"
    (tmp_path / "report.html").unlink()
    assert cli_main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").exists()
    assert capsys.readouterr().out.strip().endswith("report.html")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 2
    (empty / "results.json").write_text("[1, 2]")
    assert cli_main(["report", str(empty)]) == 2
    assert "not a JSON object" in capsys.readouterr().err
    assert not (empty / "report.html").exists()


# --------------------------------------------------------------------------- model values


def test_model_values_for_a_werner_link() -> None:
    scenario, results = make_scenario(), make_results()
    model = app_model(scenario, "epr-ab", results["apps"]["epr-ab"])
    # Werner state, V = 0.95: F = (1+3V)/4 and S = 2*sqrt(2)*(4F-1)/3 = 2*sqrt(2)*V.
    assert model.fidelity == pytest.approx((1 + 3 * 0.95) / 4, abs=1e-12)
    assert model.chsh == pytest.approx(2 * math.sqrt(2) * 0.95, abs=1e-12)
    # p/T of the double-click link: eta = 10^(-0.2*5/10) * 0.9, p = eta^2/2, T = 10 km * 4.9 us/km.
    eta = 10 ** (-0.1) * 0.9
    assert model.pair_rate_hz == pytest.approx(eta**2 / 2 / (10 * 4.9e-6), rel=1e-3)
    assert model.note == ""


def test_model_values_are_skipped_where_they_do_not_hold() -> None:
    scenario, results = make_scenario(), make_results()
    single = app_model(scenario, "epr-bc", results["apps"]["epr-bc"])
    assert single.fidelity is None and single.chsh is None and single.pair_rate_hz is not None
    assert "single-click" in single.note

    waiting = copy.deepcopy(results["apps"]["epr-ab"])
    waiting["requested"]["wait_s"] = 0.01
    model = app_model(scenario, "epr-ab", waiting)
    assert model.fidelity is None and model.pair_rate_hz is not None and "wait" in model.note

    noisy = make_scenario()
    noisy["nodes"]["bob"]["memory"]["gate_fidelity"] = 0.99
    assert app_model(noisy, "epr-ab", results["apps"]["epr-ab"]).fidelity is None
    decohering = make_scenario()
    decohering["nodes"]["alice"]["memory"]["t2"] = 1.0
    assert app_model(decohering, "epr-ab", results["apps"]["epr-ab"]).fidelity is None

    unlinked = app_model(scenario, "x", {"nodes": ["alice", "dave"]})
    assert unlinked.pair_rate_hz is None and unlinked.fidelity is None and unlinked.chsh is None


def test_link_model_matches_physics() -> None:
    link = make_scenario()["links"][0]
    model = link_model(link)
    expected = double_click_model(10.0, detector_efficiency=0.9, visibility=0.95, attenuation_db_per_km=0.2)
    assert model.pair_rate_hz == expected.pair_rate_hz and model.fidelity == expected.fidelity
    assert link_model(make_scenario()["links"][2]) is None  # no entanglement section
    assert link_model({"length_km": 5.0, "entanglement": {"scheme": "single-click"}}) is None  # no alpha


# --------------------------------------------------------------------------- progress series


def test_series_keeps_numeric_metrics_only() -> None:
    rec = SeriesRecorder()
    rec.record("a", 0.5, {"pairs_measured": 3, "fidelity": None, "chsh": math.nan, "ok": True, "wall_s": 0.1,
                          "error": "x", "fidelity_stderr": 0.1})  # fmt: skip
    assert rec.to_dict() == {"a": [{"t_s": 0.5, "pairs_measured": 3, "fidelity_stderr": 0.1}]}


def test_series_is_bounded_even_and_keeps_both_ends() -> None:
    rec = SeriesRecorder(max_points=100)
    n = 10_000
    for k in range(n):
        rec.record("a", k * 0.2, {"pairs_measured": k})
    points = rec.to_dict()["a"]
    assert len(points) <= 101
    assert len(points) >= 50  # halving never leaves fewer than max_points / 2
    assert points[0]["pairs_measured"] == 0 and points[-1]["pairs_measured"] == n - 1
    gaps = {b["pairs_measured"] - a["pairs_measured"] for a, b in zip(points[:-2], points[1:-1], strict=True)}
    assert len(gaps) == 1  # evenly spaced (the last point may be closer)
    assert [p["t_s"] for p in points] == sorted(p["t_s"] for p in points)


def test_series_of_a_short_run_is_complete() -> None:
    rec = SeriesRecorder(max_points=100)
    for k in range(30):
        rec.record("a", k, {"pairs_measured": k})
        rec.record("b", k, {"pairs_measured": 2 * k})
    out = rec.to_dict()
    assert [p["pairs_measured"] for p in out["a"]] == list(range(30))
    assert len(out["b"]) == 30
    with pytest.raises(ValueError):
        SeriesRecorder(max_points=1)


def test_orchestrator_logs_a_failed_rendering_and_carries_on(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from emulator.runtime.driver import RunDriver

    run = SimpleNamespace(run_dir=tmp_path, _rel=str)  # no results.json: rendering fails
    message = RunDriver._write_report(run)  # type: ignore[arg-type]
    assert message is not None and message.startswith("report.html not written: FileNotFoundError")
    assert "\n" not in message
    assert "Traceback" in (tmp_path / "orchestrator.log").read_text()
    assert not (tmp_path / "report.html").exists()


def test_report_lists_faults_and_the_steps_taken(tmp_path: Path) -> None:
    results = make_results()
    results["runtime"] = "docker"
    results["faults"] = {
        "planned": [
            {"index": 1, "kind": "node-crash", "description": "node-crash bob at 5 s for 1 s"},
            {"index": 2, "kind": "link-cut", "description": "link-cut <a>-b at 9 s"},
        ],
        "steps": [
            {"fault": 1, "step": "apply", "action": "kill", "at_s": 5.02},
            {"fault": 1, "step": "revert", "action": "start", "at_s": 6.01},
        ],
    }
    page = write_report(tmp_path, results, make_scenario()).read_text(encoding="utf-8")
    section = page.split("<h2>Faults</h2>", 1)[1].split("<h2>", 1)[0]
    assert "runtime: docker" in section
    rows = re.findall(r"<tr>(.*?)</tr>", section)
    assert "node-crash bob at 5 s for 1 s" in rows[1] and "kill at 5.02 s; start at 6.01 s" in rows[1]
    assert "link-cut &lt;a&gt;-b at 9 s" in rows[2] and "not reached" in rows[2]  # escaped, never run
    (tmp_path / "b").mkdir()
    no_faults = write_report(tmp_path / "b", make_results(), make_scenario()).read_text(encoding="utf-8")
    assert "The scenario injects no faults." in no_faults


# --------------------------------------------------------------------------- qkd apps and links


def make_qkd_run() -> tuple[dict[str, Any], dict[str, Any]]:
    """`results.json` and `scenario.json` of a two-node QKD run with an intercept-resend window."""
    from emulator.scenario import parse_scenario, scenario_to_dict

    scenario = scenario_to_dict(parse_scenario("""\
name: bb84
duration: 12s
nodes: {alice: {}, bob: {}}
links:
  - {endpoints: [alice, bob], length_km: 25, attenuation_db_per_km: 0.21, qkd: {}}
apps:
  - {kind: qkd, name: keys, nodes: [alice, bob], duration: 10s, qber_threshold: 0.1}
faults:
  - {at: 4s, kind: qkd-intercept-resend, link: [alice, bob], fraction: 0.6, for: 2s}
"""))
    metrics = {"final_key_bits": 40960, "secret_key_rate_bps": 4096.0, "key_rate_per_pulse": 4.1e-6, "qber": 0.034,
               "qber_x": 0.033, "cascade_efficiency": 1.17, "single_photon_yield_lower": 0.04,
               "single_photon_error_upper": 0.05, "blocks_done": 8, "blocks_aborted": 2, "blocks_discarded": 0,
               "alarms": 2, "auth_rejects": 0, "sifted_bits": 123456}  # fmt: skip
    series = [{"t_s": float(t), "final_key_bits": 4096 * t, "qber_last_block": 0.033 + (0.15 if 4 <= t < 6 else 0.0),
               "qber": 0.033 + (0.02 if t >= 4 else 0.0), "qber_x": 0.033} for t in range(11)]  # fmt: skip
    results = {
        "scenario": "bb84", "run_id": "bb84-1", "status": "passed", "passed": True, "exit_code": 0, "emulated_s": 10.5,
        "apps": {"keys": {"kind": "qkd", "nodes": ["alice", "bob"], "state": "done",
                          "requested": {"key_bits": None, "duration_s": 10.0, "start_s": 0.0}, "started_s": 0.0,
                          "finished_s": 10.2, "error": None, "metrics": metrics}},
        "expectations": [],
        "stats": {"broker": {"qkd": {"alice|bob": {"pulses": 10**10, "detections": 7_000_000,
                                                    "eve": {"intercepted_detections": 800_000,
                                                            "basis_matched_detections": 400_000,
                                                            "split_detections": 0}}}}, "nodes": {}},
        "series": {"keys": series},
        "faults": {"planned": [{"index": 1, "kind": "qkd-intercept-resend", "at_s": 4.0, "for_s": 2.0,
                                "description": "qkd-intercept-resend [alice, bob] fraction 0.6 at 4 s for 2 s"}],
                   "steps": [{"fault": 1, "step": "apply", "action": "intercept", "at_s": 4.01},
                             {"fault": 1, "step": "revert", "action": "withdraw", "at_s": 6.0}]},
    }  # fmt: skip
    return results, scenario


def test_qkd_models_follow_ma_et_al() -> None:
    from emulator.physics import GYS_PARAMETERS, asymptotic_key_rate, max_distance_km
    from emulator.report.html import qkd_app_model, qkd_link_model

    results, scenario = make_qkd_run()
    link = scenario["links"][0]
    model = qkd_link_model(link)
    assert model is not None
    # The scenario's defaults are the GYS set (attenuation 0.21 given here): the same numbers as physics'.
    assert model.rate_per_signal_pulse == pytest.approx(asymptotic_key_rate(GYS_PARAMETERS, 25.0), rel=1e-12)
    assert model.zero_key_km == pytest.approx(max_distance_km(GYS_PARAMETERS), abs=0.02)
    assert 135.0 < model.zero_key_km < 145.0  # "reaching zero near 140 km" (issue 4)
    # Per app: signal class 0.5, Z at both ends 0.5 x 0.5, sample 5 % kept out; R_Ma / q is the bracket.
    expected = 0.5 * 0.25 * 0.95 * model.rate_per_signal_pulse / 0.5
    assert qkd_app_model(scenario, "keys", results["apps"]["keys"]) == pytest.approx(expected, rel=1e-12)
    assert qkd_link_model({**link, "qkd": None}) is None and qkd_link_model({"length_km": 1.0}) is None
    assert qkd_link_model({**link, "qkd": {"intensities": {"signal": "lots"}}}) is None


def test_report_of_a_qkd_run(tmp_path: Path) -> None:
    from emulator.report.html import QKD_PLOT_FILES

    results, scenario = make_qkd_run()
    page = write_report(tmp_path, results, scenario).read_text(encoding="utf-8")
    assert sorted(referenced_images(page)) == sorted(["topology.png", *QKD_PLOT_FILES])  # no pairs, no fidelity
    assert "No progress plot" not in page and "No fidelity plot" not in page  # nothing to apologise for
    assert_png(tmp_path / "qkd.png")
    apps = page.split("<h2>Apps</h2>", 1)[1].split("<h2>", 1)[0]
    assert "qkd app" in apps and "alice → bob" in apps and "40960 / 10 s" in apps and "8 / 2 / 0" in apps
    assert "fidelity" not in apps  # no epr-test table for a qkd-only run
    assert "sifted_bits = 123456" in apps  # metrics without a column are listed
    links = page.split("<h2>Links</h2>", 1)[1].split("<h2>", 1)[0]
    assert "<h3>QKD links</h3>" in links and "alice → bob" in links
    assert "800000" in links and "400000" in links  # what Eve did, as the broker counted it
    assert "0.48 / 0.05 / 0" in links and "0.5 / 0.25 / 0.25" in links
    faults = page.split("<h2>Faults</h2>", 1)[1].split("<h2>", 1)[0]
    assert "fraction 0.6" in faults and "intercept at 4.01 s; withdraw at 6 s" in faults


def test_qkd_plot_is_dropped_when_the_run_has_no_qkd_app(tmp_path: Path) -> None:
    write_report(tmp_path, *make_qkd_run())
    assert (tmp_path / "qkd.png").exists()
    page = write_report(tmp_path, make_results(), make_scenario()).read_text(encoding="utf-8")
    assert not (tmp_path / "qkd.png").exists() and "qkd.png" not in page and "QKD" not in page
    results, scenario = make_qkd_run()
    del results["series"]
    page = write_report(tmp_path, results, scenario).read_text(encoding="utf-8")
    assert "No QKD plot" in page and not (tmp_path / "qkd.png").exists()


def test_qkd_report_survives_garbage(tmp_path: Path) -> None:
    results, scenario = make_qkd_run()
    results["apps"]["keys"]["metrics"].update(qber="high", final_key_bits=None)
    results["series"]["keys"].append({"t_s": "later", "qber": None})
    results["faults"]["steps"] = [{"fault": 1, "step": "apply", "at_s": "soon"}, 7]
    results["stats"]["broker"]["qkd"] = {"alice|bob": "gone"}
    scenario["links"][0]["qkd"]["intensities"] = {"signal": HOSTILE}
    scenario["apps"][0]["qber_threshold"] = None
    page = write_report(tmp_path, results, scenario).read_text(encoding="utf-8")
    assert HOSTILE not in page
    for name in referenced_images(page):
        assert_png(tmp_path / name)
