"""`pgvpn bench`'s chart: ratios to the seed when it ran, Mbit/s when `--only` left it out."""

from __future__ import annotations

import warnings

import pytest

from bench import report
from bench.testbeds import Variant
from bench.tunnel import VARIANTS

BY_KEY = {v.key: v for v in VARIANTS}


def result(key: str, mbits: float) -> report.Result:
    sample = report.Sample(mbits, 1, 1.0, 1.0, 1.0, 5.0, 5.0, 9.0, 10, 2.1, 0.01, 0.01, 60.0)
    return report.Result(BY_KEY[key], [sample])


@pytest.mark.parametrize("keys", [("seed-v2", "logged"), ("logged", "openvpn-aes")])
def test_the_chart_is_drawn_without_a_warning(tmp_path, keys):
    path = tmp_path / "tunnel.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "no positive values" on a log axis
        report.chart([result(k, 100.0 * (i + 1)) for i, k in enumerate(keys)], path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_ratios_need_both_variants():
    results = [result("logged", 500.0), result("openvpn-aes", 550.0)]
    assert report.ratio(results, "logged", "openvpn-aes") == pytest.approx(500 / 550)
    assert report.ratio(results, "logged", report.baseline(results)) is None
    assert isinstance(results[0].variant, Variant)
