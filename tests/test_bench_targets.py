"""bench/: the performance targets native_bench.py ends with, the Go aws-sigv4-proxy's
place in the report and the JSON, and ``--go-proxy``. Pure and fast: nothing is started
and no load is made; the figures are the made-up rounds of test_bench_load.fake_results.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import native_bench
from harness.native import go_workloads
from harness.report import render
from harness.results import GO_NOT_GIVEN, GO_TARGET
from harness.summary import Ratio, Summary, summarize, to_json
from harness.targets import _signing_problem, go_proxy_cmd
from harness.tools import GO_BUILDINFO_MAGIC, go_build_info, go_proxy_problem
from harness.verdicts import GO_SKIPPED, Verdict, verdicts

from tests.test_bench_load import GO_PATH, fake_results, table

# --------------------------------------------------------------------------- verdicts


def summary(go_proxy: str | None = GO_PATH) -> Summary:
    return summarize(fake_results(go_proxy))


def by_topic(found: list[Verdict]) -> dict[str, Verdict]:
    """The verdicts by what they are about (their order is the report's)."""
    topics = ["rps 1", "rps 2", "rps go", "cpu", "p99", "ttfb", "rss"]
    assert len(found) == len(topics)
    return dict(zip(topics, found, strict=True))


def ratio(s: Summary, attr: str, value: float) -> None:
    row = next(r for r in s.ratios if r.workload == "POST 1 KiB")
    setattr(row, attr, Ratio(value, [value, value]))


def cpu(s: Summary, ms: float) -> None:
    row = next(r for r in s.rows if r.workload == "POST 1 KiB" and r.target == "sigproxy 1 worker")
    row.cpu_s_per_1k = ms


def open_loop_p99(s: Summary, value: float) -> None:
    s.open_loop_p99_ratio = Ratio(value, [value, value])


def ttfb_delta(s: Summary, delta: float) -> None:
    direct = next(t for t in s.ttfb if t.target == "direct (aiohttp)")
    sig = next(t for t in s.ttfb if t.target == "sigproxy 1 worker")
    sig.ttfb_ms = (direct.ttfb_ms or 0) + delta


def peak_rss(s: Summary, bytes_: int) -> None:
    assert s.rss is not None
    s.rss.peak_kb = bytes_ // 1024


SETTERS: dict[str, Callable[[Summary, float], None]] = {
    "rps 1": lambda s, v: ratio(s, "rps_1", v),
    "rps 2": lambda s, v: ratio(s, "rps_n", v),
    "rps go": lambda s, v: ratio(s, "rps_n_go", v),
    "cpu": cpu,
    "p99": open_loop_p99,
    "ttfb": ttfb_delta,
    "rss": lambda s, v: peak_rss(s, int(v)),
}


@pytest.mark.parametrize(
    ("topic", "value", "status"),
    [
        ("rps 1", 0.60, "met"),
        ("rps 1", 0.599, "missed"),
        ("rps 1", 0.75, "met"),
        ("rps 2", 0.70, "met"),
        ("rps 2", 0.699, "missed"),
        ("rps go", 1.30, "met"),
        ("rps go", 1.299, "missed"),
        ("rps go", 0.9, "missed"),
        ("cpu", 0.08, "met"),
        ("cpu", 0.0801, "missed"),
        ("cpu", 0.254, "missed"),
        ("p99", 1.2, "met"),
        ("p99", 1.201, "missed"),
        ("p99", 0.9, "met"),
        ("ttfb", 1.0, "met"),
        ("ttfb", 1.001, "missed"),
        ("ttfb", 0.52, "met"),
        ("rss", 58_593 * 1024, "met"),  # VmHWM is in KiB: 59,999,232 bytes
        ("rss", 58_594 * 1024, "missed"),  # 60,000,256 bytes
    ],
)
def test_each_target_either_side_of_its_limit(topic: str, value: float, status: str) -> None:
    s = summary()
    SETTERS[topic](s, value)
    found = by_topic(verdicts(s))
    assert found[topic].status == status
    assert found[topic].value == pytest.approx(value, rel=1e-6)


def test_the_limits_as_the_issue_sets_them() -> None:
    found = by_topic(verdicts(summary()))
    limits = {topic: v.limit for topic, v in found.items()}
    assert limits == {"rps 1": 0.60, "rps 2": 0.70, "rps go": 1.3, "cpu": 0.08, "p99": 1.2,
                      "ttfb": 1.0, "rss": 60_000_000}  # fmt: skip
    texts = {topic: v.text for topic, v in found.items()}
    assert "x Envoy concurrency 1 (target >= 0.60x)" in texts["rps 1"]
    assert "x Envoy concurrency 2 (target >= 0.70x with 2 workers and 2 threads)" in texts["rps 2"]
    assert "1.500x the Go aws-sigv4-proxy (target >= 1.3x with 2 workers)" in texts["rps go"]
    assert texts["cpu"].startswith("sigproxy CPU per request, 1 KiB POST, 1 worker: 0.019 ms")
    assert "(median over the runs; target <= 0.08 ms)" in texts["cpu"]
    assert "Envoy concurrency 1 (target <= 1.2x)" in texts["p99"]
    assert texts["ttfb"].endswith("difference 0.515 ms (target <= 1 ms)")


def test_cpu_is_the_median_over_the_rounds_in_ms_per_request() -> None:
    """Proxy CPU s per 1,000 requests is ms per request: (0.31 s / 24,007 and 0.61 s /
    24,014 requests) * 1,000, median of the two."""
    found = by_topic(verdicts(summary()))
    per_round = [0.31 / 24_007 * 1000, 0.61 / 24_014 * 1000]
    assert found["cpu"].value == pytest.approx(sum(per_round) / 2)


def test_go_skipped_without_go_proxy() -> None:
    s = summary(go_proxy=None)
    found = by_topic(verdicts(s))
    assert found["rps go"].status == GO_SKIPPED == "n/a (skipped: no --go-proxy PATH)"
    assert found["rps go"].value is None
    assert found["rps 1"].status == "missed"  # the others are still judged

    markdown = render(s)
    assert "\n- Go aws-sigv4-proxy: skipped (no --go-proxy PATH given)\n" in markdown
    rows = [r for r in table(markdown, "| workload | target | runs |") if r[1] == GO_TARGET]
    assert [r[:3] for r in rows] == [
        ["POST 1 KiB", GO_TARGET, f"skipped: {GO_NOT_GIVEN}"],
        ["POST 1 MiB", GO_TARGET, f"skipped: {GO_NOT_GIVEN}"],
    ]
    ratios = {c[0]: c for c in table(markdown, "| workload | req/s 1 worker")}
    assert ratios["POST 1 KiB"][5] == "n/a"
    assert f"x the Go aws-sigv4-proxy (target >= 1.3x with 2 workers): {GO_SKIPPED}" in markdown

    doc = json.loads(to_json(s))
    assert doc["go_skip"] == GO_NOT_GIVEN
    assert doc["verdicts"][2]["status"] == GO_SKIPPED


def test_go_skipped_for_another_reason_and_two_worker_targets_need_two() -> None:
    s = summary()
    s.go_skip = "it did not start"
    assert by_topic(verdicts(s))["rps go"].status == "n/a (skipped: it did not start)"
    s = summary()
    s.settings.workers = 4
    found = by_topic(verdicts(s))
    for topic in ("rps 2", "rps go"):
        assert found[topic].status.startswith("not assessed (the target is for 2;"), topic
    assert found["rps 1"].status == "missed"


def test_nothing_measured_is_not_met() -> None:
    s = summary()
    s.ratios = []
    s.rows = []
    s.open_loop_p99_ratio = Ratio(None, [None, None])
    s.ttfb = []
    s.rss = None
    found = by_topic(verdicts(s))
    assert all(v.status.startswith("n/a") and v.value is None for v in found.values()), found
    assert found["rps 1"].status == "n/a (POST 1 KiB was not run)"


# --------------------------------------------------------------------------- report, JSON


def test_go_rows_ratios_and_check_in_the_report_and_the_json() -> None:
    s = summary()
    markdown = render(s)
    doc = json.loads(to_json(s))

    go_rows = [r for r in doc["rows"] if r["target"] == GO_TARGET]
    assert [r["workload"] for r in go_rows] == ["POST 1 KiB", "POST 1 MiB"]
    assert go_rows[0]["rps"] == pytest.approx((24_007 + 24_014) / 2 / 3)
    shown = {(c[0], c[1]): c for c in table(markdown, "| workload | target | runs |")}
    assert shown["POST 1 KiB", GO_TARGET][4] == f"{go_rows[0]['rps']:.1f}"
    per_run = {(c[0], c[1]): c for c in table(markdown, "| workload | target | req/s | p99 ms |")}
    assert per_run["POST 1 MiB", GO_TARGET][2] == ", ".join(
        f"{x['rps']:.1f}" for x in go_rows[1]["per_run"]
    )

    ratios = {r["workload"]: r for r in doc["ratios"]}
    go = ratios["POST 1 KiB"]["rps_n_go"]  # sigproxy 2 workers / Go, within each round
    assert go["per_run"] == [pytest.approx(36_007 / 24_007), pytest.approx(36_014 / 24_014)]
    cells = {c[0]: c for c in table(markdown, "| workload | req/s 1 worker")}
    assert cells["POST 1 KiB"][5] == f"{go['median']:.3f} ({go['per_run'][0]:.3f}, " + (
        f"{go['per_run'][1]:.3f})"
    )

    assert doc["go_skip"] is None
    assert doc["go_command"].startswith(GO_PATH)
    assert f"- Go aws-sigv4-proxy (rows '{GO_TARGET}'): `{GO_PATH} --port" in markdown
    check = next(c for c in doc["checks"] if c["target"] == GO_TARGET)
    assert check["sent"] == {"x-amz-content-sha256": "", "signed_headers": "host;x-amz-date"}
    assert (
        f"- signing check: {GO_TARGET}: OK in 2 of 2 runs; the upstream saw "
        "x-amz-content-sha256 not sent, SignedHeaders=host;x-amz-date\n"
    ) in markdown


def test_the_machine_in_the_header_and_the_json() -> None:
    s = summary()
    doc = json.loads(to_json(s))
    assert doc["machine"]["cpu_model"] == "test CPU"
    assert doc["machine"]["cpus"] == "2"
    assert "- machine: processor test CPU (/proc/cpuinfo model name), 2 cores" in render(s)


# --------------------------------------------------------------------------- the Go proxy


def test_go_proxy_flags() -> None:
    assert go_proxy_cmd("/x/aws-sigv4-proxy", 8001, 9001) == [
        "/x/aws-sigv4-proxy", "--port", "127.0.0.1:8001", "--name", "lambda", "--region",
        "us-east-1", "--host", "127.0.0.1:9001", "--upstream-url-scheme", "http",
    ]  # fmt: skip
    assert go_workloads(["GET", "POST 1 KiB", "POST 1 MiB"]) == ["POST 1 KiB", "POST 1 MiB"]


def echoed(digest: str | None) -> dict[str, str]:
    seen = {
        "authorization": "AWS4-HMAC-SHA256 Credential=AKIDBENCHEXAMPLE/20261130/us-east-1/"
        "lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=00",
        "x-amz-security-token": "benchtoken",
        "host": "127.0.0.1:9001",
        "x-amz-content-sha256": "",  # nginx's $http_x_amz_content_sha256 when not sent
    }
    if digest is not None:
        seen["x-amz-content-sha256"] = digest
    return seen


def test_signing_check_of_the_payload_hash() -> None:
    import hashlib

    body = b"sigproxy native bench"
    good = hashlib.sha256(body).hexdigest()
    for payload_header in (True, False):
        assert _signing_problem(echoed(good), body, 9001, payload_header) is None
        problem = _signing_problem(echoed("UNSIGNED-PAYLOAD"), body, 9001, payload_header)
        assert problem == "x-amz-content-sha256='UNSIGNED-PAYLOAD'"
        assert _signing_problem(echoed("0" * 64), body, 9001, payload_header)
    # Not sent: wrong for sigproxy and Envoy, allowed for the Go proxy (aws-sdk-go sends
    # it only for S3 and Glacier; its signature still covers the body's SHA-256).
    assert _signing_problem(echoed(None), body, 9001, True) == "x-amz-content-sha256=''"
    assert _signing_problem(echoed(None), body, 9001, False) is None
    assert _signing_problem(echoed(None), body, 9002, False) == "host='127.0.0.1:9001'"


def test_go_build_info() -> None:
    """The Go version and module info as a Go >= 1.18 binary carries them."""
    mod = "path\taws-sigv4-proxy/cmd\ndep\tgithub.com/aws/aws-sdk-go\tv1.55.8\t\n"
    header = GO_BUILDINFO_MAGIC + bytes([8, 0x2]) + bytes(16)
    blob = bytes([8]) + b"go1.19.8" + bytes([len(mod)]) + mod.encode()
    assert go_build_info(b"\x7fELF" + bytes(100) + header + blob) == ("go1.19.8", mod)
    assert go_build_info(b"\x7fELF not go") is None
    old_style = GO_BUILDINFO_MAGIC + bytes([8, 0x0]) + bytes(16)  # pointers, not inline
    assert go_build_info(old_style + blob) is None


# --------------------------------------------------------------------------- --go-proxy


def test_go_proxy_is_optional() -> None:
    assert native_bench.parse_args(["--quick"]).go_proxy is None


def test_go_proxy_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "aws-sigv4-proxy"
    binary.write_bytes(b"#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    args = native_bench.parse_args(["--quick", "--go-proxy", "aws-sigv4-proxy"])
    assert args.go_proxy == str(binary.resolve())  # absolute: servers run from the repo root


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "not a file"),
        (lambda p: p.write_bytes(b"data"), "not executable"),
    ],
)
def test_go_proxy_that_cannot_run_stops_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: Callable[[Path], None],
    problem: str,
) -> None:
    path = tmp_path / "aws-sigv4-proxy"
    make(path)
    assert go_proxy_problem(str(path)) == problem
    with pytest.raises(SystemExit) as exc:
        native_bench.parse_args(["--go-proxy", str(path)])
    assert str(exc.value.code) == f"native_bench.py: --go-proxy {path}: {problem}"
    assert "\n" not in str(exc.value.code)
    assert capsys.readouterr().err == ""  # not argparse's usage: the one line is the message


def test_go_skipped_is_said_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import contextlib

    from harness.native import NativeBench, settings_from

    with contextlib.ExitStack() as stack:
        bench = NativeBench(settings_from(native_bench.parse_args(["--quick"])), stack, tmp_path)
    assert bench.results.go_skip == GO_NOT_GIVEN
    assert "Go aws-sigv4-proxy: skipped (no --go-proxy PATH given)" in capsys.readouterr().err
