"""visbatch's outputs in DuckDB: read as tables, and clip-score's rows joined with select-data's
manifest on the sample ``key`` (no string surgery on paths)."""

from __future__ import annotations

import io
import tarfile

import pytest

from conftest import FIXTURE_IMAGES, PHOTOS, invoke_cli

duckdb = pytest.importorskip("duckdb")
pytestmark = pytest.mark.slow
TINY_CLIP = ["--model", "test-tiny-clip", "--device", "cpu", "--workers", "0"]


def test_clip_score_joins_select_data_on_the_key(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for shard in range(2):
        with tarfile.open(pool / f"{shard:05d}.tar", "w") as tar:
            for n, name in enumerate(PHOTOS):
                for extension, data in (
                    ("jpg", (FIXTURE_IMAGES / name).read_bytes()),
                    ("txt", f"photo {name} {shard}".encode()),
                ):
                    info = tarfile.TarInfo(f"{shard:05d}{n:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    scores, manifest = tmp_path / "scores.parquet", tmp_path / "manifest.parquet"
    result = invoke_cli("clip-score", pool, *TINY_CLIP, "--sidecar", "-o", scores)
    assert result.exit_code == 0, result.output
    result = invoke_cli("select-data", pool, *TINY_CLIP, "--budget", "3", "-o", manifest)
    assert result.exit_code == 0, result.output
    rows = duckdb.sql(
        f"SELECT c.key, c.clip_score, s.selected, s.reason FROM '{scores}' c JOIN '{manifest}' s USING (key) "
        "ORDER BY c.key"
    ).fetchall()
    assert [r[0] for r in rows] == [f"{s:05d}{n:04d}" for s in range(2) for n in range(len(PHOTOS))]
    assert sum(r[2] for r in rows) <= 3 and all(isinstance(r[1], float) for r in rows)
    # the second shard holds exact copies of the first's photos: never both copies selected
    chosen = {r[0][5:] for r in rows if r[2]}
    assert len(chosen) == sum(r[2] for r in rows)
    count = duckdb.sql(f"SELECT count(*) FROM '{scores}' WHERE status = 'ok'").fetchall()
    assert count == [(2 * len(PHOTOS),)]
