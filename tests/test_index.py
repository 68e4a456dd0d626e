"""The tile index: schema, footprints, metadata, order; bad files skipped, or fatal (--strict)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image
from typer.testing import CliRunner

from geo.classes import DEEPGLOBE, DFC10, EUROSAT_CLASSES, S2_BANDS
from geo.errors import DataError
from geo.index import COLUMNS, band_statistics, build_index, read_index, stored_band_statistics, write_index
from geo.readers import Scaling
from geo.sample_data import write_sen12ms
from pipeline.cli import app
from pipeline.ingest import ingest

# DeepGlobe JPEGs have no georeferencing by design
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

runner = CliRunner()


def test_sen12ms_index_rows_columns_and_metadata(sen12ms_root: Path, sen12ms_index: Path) -> None:
    frame, metadata = read_index(sen12ms_index)
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) == len(list(sen12ms_root.glob("*/s2_*/*.tif"))) == 512
    assert list(frame["path"]) == sorted(frame["path"])
    assert frame["path"].map(lambda p: Path(p).is_absolute()).all()
    assert (frame["source"] == "sen12ms").all() and frame["s1_path"].notna().all()
    assert frame.groupby("scene")["season"].nunique().eq(2).all()
    assert metadata["source"] == "sen12ms" and metadata["skipped"] == []
    assert metadata["scheme"]["names"] == list(DFC10.names)
    assert metadata["bands"] == list(S2_BANDS) and metadata["pixel_footprints"] is False
    assert metadata["feature_names"][:6] == [
        "B1_mean",
        "B1_std",
        "B1_q10",
        "B1_q50",
        "B1_q90",
        "B2_mean",
    ]
    assert b"geo" in pq.read_schema(sen12ms_index).metadata  # GeoParquet
    row = frame.iloc[0]
    assert len(row["features"]) == len(metadata["feature_names"]) == 65
    assert sum(row["class_counts"]) == 32 * 32 and len(row["class_counts"]) == 10
    assert row["majority_class"] == int(np.argmax(row["class_counts"]))
    assert (row["row_off"], row["col_off"], row["width"], row["height"]) == (0, 0, 32, 32)


def test_features_are_the_scaled_band_statistics(sen12ms_index: Path) -> None:
    from geo.readers import load_tile
    from geo.sources.sen12ms import Sen12ms

    frame, _ = read_index(sen12ms_index)
    row = frame.iloc[7]
    image = load_tile(row, Sen12ms()).image
    features = np.asarray(row["features"]).reshape(13, 5)
    assert features[:, 0] == pytest.approx(image.mean(axis=(1, 2)), rel=1e-5)
    assert features[:, 1] == pytest.approx(image.std(axis=(1, 2)), rel=1e-4)
    assert features[:, 3] == pytest.approx(np.median(image.reshape(13, -1), axis=1), rel=1e-5)
    assert (features[:, 2] <= features[:, 3]).all() and (features[:, 3] <= features[:, 4]).all()


# --- statistics from the pixels as stored: what np.quantile, mean and std give on the scaled pixels --


def _reference_statistics(scaled: np.ndarray) -> np.ndarray:
    """Per band: mean, std, q10, q50, q90 of the finite scaled pixels, the plain numpy way."""
    rows = []
    for band in scaled.reshape(len(scaled), -1).astype(np.float64):
        finite = band[np.isfinite(band)]
        rows.append([finite.mean(), finite.std(), *np.quantile(finite, [0.1, 0.5, 0.9])])
    return np.array(rows)


STORED: dict[str, tuple[str, tuple[list[float], list[float]] | None]] = {
    "uint16 reflectance, some above 10000": ("uint16", None),
    "uint8": ("uint8", None),
    "int16 with negative values": ("int16", None),
    "int8": ("int8", None),
    "uint16, scale/offset tags (one negative scale)": ("uint16", ([1e-4, -1e-4, 2.0, 1.0], [-0.1, 1.0, 0.0, 0.0])),
    "int16, scale/offset tags": ("int16", ([1e-4, 1e-4, 1.0, 3e-5], [0.0, -0.05, 0.0, 0.2])),
    "uint8, scale/offset tags": ("uint8", ([0.004, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])),
}


@pytest.mark.parametrize("case", STORED)
def test_statistics_from_stored_integers_are_those_of_the_scaled_pixels(case: str) -> None:
    dtype, tags = STORED[case]
    info = np.iinfo(dtype)
    rng = np.random.default_rng(len(case))
    pixels = rng.integers(info.min, int(info.max) + 1, size=(4, 37, 29), endpoint=False).astype(dtype)
    pixels[1] = np.clip(rng.normal(1200, 300, (37, 29)), info.min, info.max).astype(dtype)  # many repeats
    pixels[2, :5] = info.max
    scaling = Scaling(*(tuple(values) for values in tags)) if tags else Scaling((1.0,) * 4, (0.0,) * 4)
    scaled = scaling(pixels)
    interleaved = np.ascontiguousarray(pixels.transpose(1, 2, 0)).transpose(2, 0, 1)  # as read_as_stored gives
    for layout in (pixels, interleaved):
        stored = stored_band_statistics(layout, scaling)
        assert stored is not None
        np.testing.assert_allclose(stored.reshape(4, 5), _reference_statistics(scaled), rtol=0, atol=1e-6)
        # the quantiles are exactly those of the sort-based statistics on the scaled image
        np.testing.assert_array_equal(stored.reshape(4, 5)[:, 2:], band_statistics(scaled).reshape(4, 5)[:, 2:])


def test_floats_are_summarised_from_the_scaled_image() -> None:
    pixels = np.full((2, 4, 4), 5000.0, dtype=np.float32)
    assert stored_band_statistics(pixels, Scaling((1.0, 1.0), (0.0, 0.0))) is None


INDEXED = {
    "uint16": lambda raw: (raw.astype(np.uint16), None),
    "int16": lambda raw: ((raw.astype(np.int32) - 400).astype(np.int16), None),
    "uint8": lambda raw: ((raw // 50).clip(0, 255).astype(np.uint8), None),
    "float32 with NaN and inf": lambda raw: (_holed(raw.astype(np.float32)), None),
    "int16 tagged": lambda raw: (raw.astype(np.int16), ([1e-4] * 12 + [-2e-4], [0.0] * 12 + [1.0])),
    "float32 tagged with NaN": lambda raw: (_holed(raw.astype(np.float32) / 10000), ([1e-4] + [1.0] * 12, [0.0] * 13)),
}


def _holed(pixels: np.ndarray) -> np.ndarray:
    pixels[:, 2:4] = np.nan
    pixels[3, 9, 9] = np.inf
    pixels[5, 1, :3] = -np.inf
    return pixels


@pytest.mark.parametrize("kind", INDEXED)
@pytest.mark.parametrize("workers", [1, 2])
def test_index_features_are_the_statistics_of_the_scaled_finite_pixels(
    kind: str, workers: int, eurosat_root: Path, tmp_path: Path
) -> None:
    """Whatever the scene's type and tags, and however many readers: features are np.quantile,
    mean and std of the scaled pixels that are finite (`scale_image`, as training reads them)."""
    sources = sorted(eurosat_root.glob("*/*.tif"))[:3]
    expected = []
    for number, patch in enumerate(sources):
        with rasterio.open(patch) as src:
            profile, raw = src.profile, src.read()
        pixels, tags = INDEXED[kind](raw)
        out = tmp_path / "data" / f"Class{number % 2}" / f"{number}.tif"
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", **{**profile, "dtype": pixels.dtype, "nodata": None}) as dst:
            dst.write(pixels)
            if tags:
                dst.scales, dst.offsets = tags
        scaling = Scaling(*(tuple(values) for values in tags)) if tags else Scaling((1.0,) * 13, (0.0,) * 13)
        expected.append((out, _reference_statistics(scaling(pixels))))
    frame = build_index("folder", tmp_path / "data", workers=workers, progress=False).frame
    for path, reference in expected:
        (features,) = frame.loc[frame["path"] == str(path), "features"]
        np.testing.assert_allclose(np.reshape(features, (13, 5)), reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_patch_cut_short_in_its_pixels_is_skipped_not_read_as_zeros(keep: float, tmp_path: Path) -> None:
    root = write_sen12ms(tmp_path / "data", seed=3, regions=1, size=64, patches_per_region=2)
    cut = sorted(root.glob("*/s2_*/*.tif"))[1]
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * keep)])
    result = build_index("sen12ms", root, workers=2, progress=False)
    assert [(entry.path, "cannot be read" in entry.reason) for entry in result.skipped] == [(str(cut), True)]
    assert len(result.frame) == 3


def test_footprints_lie_in_their_utm_zone(sen12ms_index: Path) -> None:
    frame, _ = read_index(sen12ms_index)
    assert frame.crs.to_epsg() == 4326
    for crs, geometry in zip(frame["crs"], frame.geometry):
        epsg = int(crs.removeprefix("EPSG:"))
        zone, south = epsg % 100, epsg >= 32700
        meridian = -183 + 6 * zone
        west, lat_min, east, lat_max = geometry.bounds
        assert meridian - 3.5 < west < east < meridian + 3.5
        assert (lat_max < 0) if south else (lat_min > 0)
        assert 0.002 < east - west < 0.01  # 320 m at mid latitudes


def test_deepglobe_index_has_pixel_footprints(deepglobe_index: Path) -> None:
    frame, metadata = read_index(deepglobe_index)
    assert len(frame) == 12 * 16 and metadata["grid"] == 4
    assert metadata["pixel_footprints"] is True and frame.crs is None and frame["crs"].isna().all()
    assert metadata["scheme"]["names"] == list(DEEPGLOBE.names) and len(metadata["feature_names"]) == 15
    assert frame["scene"].nunique() == 12 and frame["season"].isna().all()
    tile = frame.iloc[6]  # third row of the grid's second row: window at x=64, y=32
    assert (tile["col_off"], tile["row_off"]) == (64, 32)
    assert tile.geometry.bounds == (64, 32, 96, 64)


def test_eurosat_index(eurosat_index: Path) -> None:
    frame, metadata = read_index(eurosat_index)
    assert len(frame) == 40 and metadata["scheme"]["names"] == sorted(EUROSAT_CLASSES)
    assert frame["label_path"].isna().all()
    names = frame["path"].map(lambda p: Path(p).parent.name)
    assert list(names.map(metadata["scheme"]["names"].index)) == list(frame["majority_class"])
    assert frame["class_counts"].map(lambda c: sorted(c)[-1] == 64 * 64).all()
    assert frame["crs"].nunique() == 3


@pytest.mark.parametrize("layout", ["deepglobe", "sen12ms"])
def test_worker_count_does_not_change_the_index(layout: str, deepglobe_root: Path, sen12ms_root: Path) -> None:
    root = {"deepglobe": deepglobe_root, "sen12ms": sen12ms_root}[layout]
    one = build_index(layout, root, workers=1, progress=False).frame
    three = build_index(layout, root, workers=3, progress=False, grid=4).frame
    assert one.drop(columns="geometry").to_json() == three.drop(columns="geometry").to_json()
    assert one.geometry.equals(three.geometry)


def test_write_index_keeps_extra_columns_and_metadata(eurosat_index: Path, tmp_path: Path) -> None:
    frame, metadata = read_index(eurosat_index)
    frame["region"] = frame["crs"]
    metadata["regions"] = {"method": "metadata"}
    out = write_index(frame, tmp_path / "with-regions.parquet", metadata)
    again, again_metadata = read_index(out)
    assert list(again["region"]) == list(frame["crs"]) and again_metadata["regions"] == {"method": "metadata"}
    assert [p.name for p in tmp_path.iterdir()] == ["with-regions.parquet"]  # no temporary left


def test_read_index_rejects_other_files(tmp_path: Path, sen12ms_root: Path) -> None:
    with pytest.raises(DataError, match="no such index"):
        read_index(tmp_path / "absent.parquet")
    not_parquet = next(sen12ms_root.rglob("*.tif"))
    with pytest.raises(DataError, match="not a GeoParquet") as error:
        read_index(not_parquet)
    assert error.value.path == str(not_parquet)


# --- bad files: skipped and listed by default, fatal under --strict ------------------------------


@pytest.fixture
def damaged_sen12ms(tmp_path: Path) -> tuple[Path, list[Path]]:
    """8 patches; one truncated, one with 12 bands, one without its lc file."""
    root = write_sen12ms(tmp_path / "data", seed=2, regions=1, size=16, patches_per_region=4)
    s2 = sorted(root.glob("*/s2_*/*.tif"))
    s2[0].write_bytes(s2[0].read_bytes()[:3000])
    with rasterio.open(s2[2]) as src:
        profile, pixels = src.profile, src.read()
    with rasterio.open(s2[2], "w", **{**profile, "count": 12}) as dst:
        dst.write(pixels[:12])
    Path(str(s2[3]).replace("/s2_", "/lc_").replace("_s2_", "_lc_")).unlink()
    return root, [s2[0], s2[2], s2[3]]


def test_bad_files_are_skipped_and_listed(damaged_sen12ms: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, bad = damaged_sen12ms
    summary = ingest("sen12ms", root, tmp_path / "index.parquet", progress=False)
    assert summary.rows == 8 - 3 and summary.tiles_per_second > 0
    assert [entry.path for entry in summary.skipped] == [str(p) for p in bad]
    frame, metadata = read_index(tmp_path / "index.parquet")
    assert len(frame) == 5 and not set(frame["path"]) & {str(p) for p in bad}
    assert [entry["path"] for entry in metadata["skipped"]] == [entry.path for entry in summary.skipped]
    assert "12 bands" in metadata["skipped"][1]["reason"]


def test_cli_ingest_lists_skipped_files(damaged_sen12ms: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, bad = damaged_sen12ms
    out = tmp_path / "index.parquet"
    result = runner.invoke(app, ["ingest", str(root), "--source", "sen12ms", "--out", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "5 tiles" in result.stdout and "3 files skipped" in result.stdout
    assert f"skipped {bad[0]}: cannot be" in result.stderr


def test_cli_strict_exits_non_zero_and_writes_nothing(damaged_sen12ms: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, bad = damaged_sen12ms
    out = tmp_path / "out" / "index.parquet"
    result = runner.invoke(app, ["ingest", str(root), "--source", "sen12ms", "--out", str(out), "--strict"])
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]  # progress lines may come before the error, never after
    assert last.startswith(f"error: {bad[0]}: ") and "(and 2 more bad files)" in last
    assert "Traceback" not in result.output
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cli_strict_with_a_foreign_mask_colour(deepglobe_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "dg"
    shutil.copytree(deepglobe_root, root)
    mask_path = sorted(root.glob("*_mask.png"))[3]
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[100:110, 100:110] = (255, 0, 0)
    Image.fromarray(mask).save(mask_path)
    out = tmp_path / "index.parquet"
    strict = runner.invoke(app, ["ingest", str(root), "--source", "deepglobe", "--out", str(out), "--strict"])
    assert strict.exit_code == 1 and str(mask_path) in strict.stderr and not out.exists()
    lenient = runner.invoke(app, ["ingest", str(root), "--source", "deepglobe", "--out", str(out)])
    assert lenient.exit_code == 0 and "1 files skipped" in lenient.stdout
    frame, _ = read_index(out)
    assert len(frame) == 11 * 16  # the whole image is left out, not just its bad tile


def test_patch_with_other_bands_is_skipped_and_all_bad_is_fatal(tmp_path: Path, eurosat_root: Path) -> None:
    root = tmp_path / "folders"
    shutil.copytree(eurosat_root, root)
    odd = root / "Forest" / "Forest_2.tif"
    with rasterio.open(odd) as src:
        profile, pixels = src.profile, src.read()
    with rasterio.open(odd, "w", **{**profile, "count": 3}) as dst:
        dst.write(pixels[:3])
    result = build_index("folder", root, progress=False)
    assert [(s.path, s.reason) for s in result.skipped] == [(str(odd), "has 3 bands; the other images have 13")]
    assert len(result.frame) == 39 and result.metadata["bands"] == list(S2_BANDS)
    for patch in root.glob("*/*.tif"):
        patch.write_bytes(b"broken")
    with pytest.raises(DataError, match="no readable tiles in 40 files; first problem") as error:
        build_index("folder", root, progress=False)
    assert error.value.path == str(root)


def test_cli_empty_folder_and_bad_source(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "index.parquet"
    result = runner.invoke(app, ["ingest", str(tmp_path / "empty"), "--source", "folder", "--out", str(out)])
    assert result.exit_code == 1 and str(tmp_path / "empty") in result.stderr and not out.exists()
    result = runner.invoke(app, ["ingest", str(tmp_path), "--source", "landsat", "--out", str(out)])
    said = " ".join(result.output.replace("│", " ").split())
    assert (
        result.exit_code == 2 and "'landsat' is not one of 'sen12ms', 'dfc2020', 'deepglobe', 'folder', 'pairs'" in said
    )


def test_cli_sample_data_then_ingest(tmp_path: Path) -> None:
    data, out = tmp_path / "eurosat", tmp_path / "index.parquet"
    made = runner.invoke(
        app,
        [
            "sample-data",
            str(data),
            "--kind",
            "eurosat",
            "--seed",
            "1",
            "--regions",
            "2",
            "--size",
            "32",
        ],
    )
    assert made.exit_code == 0, made.output
    assert len(list(data.glob("*/*.tif"))) == 10 * 8
    indexed = runner.invoke(app, ["ingest", str(data), "--source", "folder", "--out", str(out)])
    assert indexed.exit_code == 0, indexed.output
    frame, _ = read_index(out)
    assert len(frame) == 80 and frame["crs"].nunique() == 2
    for command in ("sample-data", "ingest"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
    wrong = runner.invoke(app, ["sample-data", str(tmp_path / "x"), "--kind", "scene", "--regions", "2"])
    assert wrong.exit_code == 2 and "regions" in wrong.output
