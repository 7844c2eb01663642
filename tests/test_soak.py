"""A short soak (`make soak` runs the same for 20 s): 50 concurrent callers against
`invoice-proxy serve` over hits, misses, 404s, refusals and injected faults."""

from __future__ import annotations

from pathlib import Path

from bench.soak import soak


async def test_soak_loses_nothing_leaks_nothing_and_metrics_agree(tmp_path: Path) -> None:
    report = await soak(
        duration_s=3.0, callers=50, warm_s=1.0, rss_margin=8 << 20, workdir=tmp_path
    )
    assert report.ok, "\n".join(report.failures())
    assert report.tally.answered > 1000, "the soak hardly ran"
    kinds = {kind for kind, _ in report.tally.by_kind}
    assert kinds == {"hit", "miss", "not_found", "fault", "refused"}
    # The faults were met, each with its documented status.
    statuses = report.tally.statuses
    assert statuses[502] and statuses[504] and statuses[429] and statuses[404]
