"""demo: a fresh machine gets a searchable collection with no data and no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from simimg.jobs.demo import DEMO_CLASSES, DemoJob, build_demo, write_demo_images
from simimg.query.service import SearchService


def test_demo_images_are_the_same_every_time(tmp_path: Path):
    assert write_demo_images(tmp_path / "a", per_class=2, size=32) == 6
    write_demo_images(tmp_path / "b", per_class=2, size=32)
    for label in DEMO_CLASSES:
        first = (tmp_path / "a" / label / f"{label}_001.png").read_bytes()
        assert first == (tmp_path / "b" / label / f"{label}_001.png").read_bytes()


@pytest.mark.slow
def test_demo_builds_an_index_where_neighbours_share_the_class(tmp_path: Path):
    job = DemoJob(data_dir=str(tmp_path / "data" / "demo"), home=str(tmp_path / "indexes"), per_class=6, size=64)
    report = build_demo(job)
    assert (report.name, report.total, report.skipped) == ("demo", 18, [])
    service = SearchService(job.home, "demo", "cpu")
    for label in DEMO_CLASSES:
        result = service.query_file(Path(job.data_dir) / label / f"{label}_000.png", k=4)
        assert [n.label for n in result.neighbors] == [label] * 4
