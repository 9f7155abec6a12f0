"""The soak (scripts/soak.py), short: about 40 s of mixed traffic, adapter churn, hang-ups and two
fine-tuning jobs against a live `loramux serve` on a tiny random model. It asserts counts, never
speeds: every request got exactly one final answer, nothing unexpected went wrong, the server
ended healthy and idle, and the report and the RSS plot were written.
See docs/reliability.md, "Soak", for longer runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_checks_catch_what_the_soak_must_fail_on():
    """The soak's own detectors, on made-up streams: a soak that cannot fail proves nothing."""
    soak = load_soak()
    tally = soak.Tally()

    def stream(*events: str, choices: int = 1) -> object:
        check = soak.StreamCheck(choices, tally, {"route": "test"})
        for event in events:
            check.feed(event)
        return check

    chunk = lambda rid, index, finish=None: json.dumps({"id": rid, "choices": [{"index": index, "text": "x", "finish_reason": finish}]})  # noqa: E731
    good = stream(chunk("a", 0), chunk("a", 1), chunk("a", 0, "stop"), chunk("a", 1, "length"), "[DONE]", choices=2)
    assert good.done and not good.missing() and not tally.duplicated
    stream(chunk("b", 0, "stop"), chunk("b", 0), "[DONE]", chunk("b", 0))
    stream(chunk("a", 0, "stop"), "[DONE]")  # an id already seen
    assert tally.duplicated == {"choice continued after its finish_reason": 1, "data after [DONE]": 1, "response id seen before": 1}
    assert stream(chunk("c", 0, "stop"), "[DONE]", choices=2).missing() == [1]
    failed = stream(chunk("d", 0), json.dumps({"error": {"message": "boom", "type": "server_error", "code": 500}}), "[DONE]")
    assert failed.done and failed.error["type"] == "server_error"
    churned = {"churn0"}
    assert soak.is_expected(404, {"type": "not_found_error", "code": "model_not_found"}, "churn0", churned)
    assert not soak.is_expected(404, {"type": "not_found_error", "code": "model_not_found"}, "stable0", churned)
    assert soak.is_expected("stream", {"type": "rate_limit_error", "code": "queue_full"}, "base", churned)
    assert not soak.is_expected("stream", failed.error, "churn0", churned) and not soak.is_expected(500, None, "churn0", churned)
    assert soak.error_kind(500, failed.error) == "500 server_error/500"
    kind = soak.error_kind(404, {"type": "not_found_error", "code": "model_not_found"})
    tally.error(kind, True, {}, "a churned adapter")
    tally.error(kind, False, {}, "a stable adapter")  # the same kind, unexpected here: still counted as such
    assert tally.expected[kind] == tally.unexpected[kind] == 1


@pytest.mark.integration  # the tiny model borrows the default model's tokenizer


def test_soak_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "soak"
    run = subprocess.run([sys.executable, str(SOAK), "--duration", "40", "--clients", "6", "--out", str(out),
                          "--job-steps", "6", "--job-wait", "10", "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=600)
    assert (out / "report.json").is_file(), run.stdout + run.stderr
    report = json.loads((out / "report.json").read_text())
    requests = report["requests"]
    assert requests["lost"] == 0, report["lost"]
    assert requests["duplicated"] == 0, report["duplicated"]
    assert requests["errors_unexpected"] == 0 and requests["refused"] == 0, report["samples"]["unexpected"]
    assert requests["completed"] > 0 and requests["sent"] == (requests["completed"] + requests["errors"] + requests["disconnected"])
    assert not report["server"]["died"] and report["server"]["health_at_end"] == 200 and report["server"]["idle_at_end"]
    assert report["server"]["exit_code"] == 0
    assert report["churn"].get("load ok", 0) > 0 and report["churn"].get("unload ok", 0) > 0
    short, long = report["jobs"]  # the short job ends (or is cancelled after the drain); the long one trains throughout
    assert short["status"] == "succeeded" or (short.get("cancelled_by_soak") and short["last_step"] > 0), short
    assert long["status"] == "succeeded" or (long.get("cancelled_by_soak") and long["last_step"] > 0), long
    assert len(report["rss_samples"]) >= 30 and report["rss"]["peak_mib"] > 0
    assert (out / "rss.png").stat().st_size > 0
    assert run.returncode == 0 and "PASS" in run.stdout, run.stdout + run.stderr
