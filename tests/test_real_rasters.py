"""Real-world rasters: NaN and +-inf as nodata, scenes without data, bands matched by name,
scale/offset tags, truncated files. Real GeoTIFFs written by rasterio from the session's
generated scene; the CLI runs in-process."""

from __future__ import annotations

import os
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from geo import readers
from geo.classes import DFC10, S2_BANDS
from geo.errors import DataError
from geo.index import band_statistics, build_index
from geo.labels import read_labels
from geo.sample_data import SceneFiles
from geo.sources.base import SourceFile
from geo.sources.folder import ClassFolders
from geo.windows import PredictBatch, predict_scene
from pipeline.adapt import cut_windows
from pipeline.cli import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(arg) for arg in args])


def nearest_pixel(image: Path) -> PredictBatch:
    """A per-pixel model: a pixel's class scores are minus its distances to one pixel of the scene
    per class, from its own bands alone, so a NaN pixel can change no other pixel's class."""
    valid = np.argwhere(scene_valid(image))
    rows, cols = valid[np.random.default_rng(0).choice(len(valid), DFC10.num_classes, replace=False)].T
    centres = readers.scale_image(read_pixels(image))[:, rows, cols].T[None, :, :, None, None]

    def scores(batch: np.ndarray) -> np.ndarray:
        return -100 * np.sqrt(((batch[:, None] - centres) ** 2).sum(axis=2))

    return scores


def read_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def write_like(
    scene: SceneFiles, path: Path, pixels: np.ndarray, *, descriptions=None, scales=None, offsets=None, **profile
) -> Path:
    """`pixels` as a GeoTIFF on the scene's grid, with band names and scale/offset tags if given."""
    with rasterio.open(scene.image) as src:
        crs, transform = src.crs, src.transform
    count, height, width = pixels.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=pixels.dtype,
        crs=crs,
        transform=transform,
        **profile,
    ) as dst:
        dst.write(pixels)
        if descriptions is not None:
            dst.descriptions = tuple(descriptions)
        if scales is not None:
            dst.scales, dst.offsets = scales, offsets
    return path


def scene_valid(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.dataset_mask() > 0


@pytest.fixture(scope="module")
def stripes(scene_files: SceneFiles) -> np.ndarray:
    """(H, W) NaN stripes, two rows and two columns wide, clear of every labelled pixel."""
    pixels = read_labels(scene_files.labels, scene_files.image, DFC10)
    height, width = pixels.grid.height, pixels.grid.width
    free_rows = [r for r in range(8, height - 8) if not np.isin([r, r + 1], pixels.rows).any()]
    free_cols = [c for c in range(8, width - 8) if not np.isin([c, c + 1], pixels.cols).any()]
    mask = np.zeros((height, width), dtype=bool)
    for row in (free_rows[0], free_rows[len(free_rows) // 2]):
        mask[row : row + 2] = True
    for col in (free_cols[len(free_cols) // 3], free_cols[-1]):
        mask[:, col : col + 2] = True
    return mask


def holed_scene(scene: SceneFiles, folder: Path, stripes: np.ndarray) -> tuple[Path, Path, np.ndarray]:
    """The scene as float32 (nodata 0 kept), and the same with NaN stripes and an inf and a -inf
    in one band only; and where the holed one is invalid (nodata or non-finite)."""
    raw = read_pixels(scene.image).astype(np.float32)
    clean = write_like(scene, folder / "clean.tif", raw, nodata=0)
    holed = raw.copy()
    holed[:, stripes] = np.nan
    holed[3, 50, 60] = np.inf
    holed[11, 70, 90] = -np.inf
    invalid = stripes | ~scene_valid(clean)
    invalid[50, 60] = invalid[70, 90] = True
    return clean, write_like(scene, folder / "holed.tif", holed, nodata=0), invalid


# --- NaN and +-inf are nodata --------------------------------------------------------------------


def test_nan_stripes_map_to_255_exactly_there_and_as_without_them_elsewhere(
    scene_files: SceneFiles, stripes: np.ndarray, tmp_path: Path
):
    """A per-pixel model, so that the exact equality holds: with a network, pixels within its
    receptive field of a stripe (and, through per-window normalisation, its whole window) may
    legitimately change; what must not happen is NaN spreading or 255 off the NaN pixels."""
    clean, holed, invalid = holed_scene(scene_files, tmp_path, stripes)
    maps, model = {}, nearest_pixel(clean)
    for name, image in [("clean", clean), ("holed", holed)]:
        result = predict_scene(
            image,
            model,
            tmp_path / f"{name}.map.tif",
            scheme=DFC10,
            window=64,
            overlap=16,
            batch_size=2,
            probabilities_path=tmp_path / f"{name}.probs.tif",
        )
        assert result.probabilities is not None
        maps[name] = (read_band(result.classes), read_pixels(result.probabilities))
    (clean_classes, clean_probabilities), (classes, probabilities) = maps["clean"], maps["holed"]
    np.testing.assert_array_equal(classes == 255, invalid)
    np.testing.assert_array_equal(classes[~invalid], clean_classes[~invalid])
    np.testing.assert_array_equal(probabilities[:, ~invalid], clean_probabilities[:, ~invalid])
    assert np.isnan(probabilities[:, invalid]).all()
    assert len(np.unique(classes[~invalid])) > 3  # the model really tells pixels apart


def test_adapt_drops_labels_on_nan_and_maps_as_without_the_stripes(
    scene_files: SceneFiles, stripes: np.ndarray, tmp_path: Path
):
    """The per-pixel classifier, adapted on the same labels: the label on a stripe is dropped and
    counted, the support windows' NaN never reach it, and the maps agree off the stripes."""
    clean, holed, invalid = holed_scene(scene_files, tmp_path, stripes)
    labels = gpd.read_file(scene_files.labels)
    on_data_stripe = np.argwhere(stripes & scene_valid(clean))  # NaN is the only reason to drop it
    with rasterio.open(holed) as src:
        x, y = src.xy(*on_data_stripe[len(on_data_stripe) // 2])
        crs = src.crs
    on_stripe = gpd.GeoDataFrame({"class": [labels["class"].iloc[0]]}, geometry=gpd.points_from_xy([x], [y]), crs=crs)
    with_stripe = tmp_path / "with-stripe.gpkg"
    gpd.pd.concat([labels, on_stripe.to_crs(labels.crs)]).to_file(with_stripe, layer="labels")
    outputs = {}
    for name, image, given in [("clean", clean, scene_files.labels), ("holed", holed, with_stripe)]:
        outputs[name] = tmp_path / f"{name}.map.tif"
        result = invoke(
            "adapt", "--model", "pixel", "--no-check", "--image", image, "--labels", given, "--out", outputs[name]
        )
        assert result.exit_code == 0, result.output
    assert "1 labelled pixels lie on the scene's nodata" in result.output
    assert "adapted on 25 labelled pixels" in result.output
    classes, clean_classes = read_band(outputs["holed"]), read_band(outputs["clean"])
    np.testing.assert_array_equal(classes == 255, invalid)
    np.testing.assert_array_equal(classes[~invalid], clean_classes[~invalid])
    assert len(np.unique(classes[~invalid])) > 2


def test_a_network_maps_a_scene_with_nan_stripes(
    trained_runs: dict[str, Path], scene_files: SceneFiles, stripes: np.ndarray, tmp_path: Path
):
    """A trained U-Net: 255 exactly on the invalid pixels, finite probabilities everywhere else."""
    _, holed, invalid = holed_scene(scene_files, tmp_path, stripes)
    out, probabilities = tmp_path / "map.tif", tmp_path / "probs.tif"
    result = invoke(
        "predict",
        "--model",
        trained_runs["pretrain"],
        "--image",
        holed,
        "--out",
        out,
        "--probabilities",
        probabilities,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_band(out) == 255, invalid)
    stored = read_pixels(probabilities)
    np.testing.assert_allclose(stored[:, ~invalid].sum(axis=0), 1.0, atol=1e-4)


def test_ingest_statistics_and_class_counts_leave_out_non_finite_pixels(scene_files: SceneFiles, tmp_path: Path):
    root = tmp_path / "patches"
    patch = read_pixels(scene_files.image)[:, 64:96, 64:96].astype(np.float32)
    patch[:, 3:5] = np.nan
    patch[2, 10, 10] = np.inf
    (root / "Forest").mkdir(parents=True)
    (root / "Water").mkdir()
    write_like(scene_files, root / "Forest" / "holed.tif", patch)
    write_like(scene_files, root / "Water" / "empty.tif", np.full_like(patch, np.nan))
    result = build_index("folder", root, workers=1, progress=False)
    assert [Path(entry.path).name for entry in result.skipped] == ["empty.tif"]
    assert "hold no finite pixel" in result.skipped[0].reason
    (row,) = result.frame.itertuples()
    finite = np.isfinite(patch).all(axis=0)
    assert row.class_counts[0] == int(finite.sum()) == 32 * 32 - 2 * 32 - 1
    scaled = np.clip(np.where(np.isfinite(patch), patch, np.nan), 0, 10000).reshape(13, -1) / 10000
    features = np.asarray(row.features).reshape(13, 5)
    np.testing.assert_allclose(features[:, 0], np.nanmean(scaled, axis=1), rtol=1e-5)
    np.testing.assert_allclose(features[:, 1], np.nanstd(scaled, axis=1), rtol=1e-4)
    np.testing.assert_allclose(features[:, 3], np.nanmedian(scaled, axis=1), rtol=1e-5)
    assert np.isfinite(features).all()
    tile = readers.load_tile(
        result.frame.iloc[0], ClassFolders()
    )  # what training reads: no NaN in, nothing labelled there
    assert np.isfinite(tile.image).all() and (tile.image[:, ~finite] == 0).all()
    assert (tile.mask[~finite] == 255).all() and (tile.mask[finite] == 0).all()


def test_band_statistics_of_a_band_ignore_its_non_finite_pixels():
    image = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    image[0, 0, :3] = [np.nan, np.inf, -np.inf]
    statistics = band_statistics(image).reshape(2, 5)
    first = image[0][np.isfinite(image[0])]
    assert statistics[0].tolist() == pytest.approx([first.mean(), first.std(), *np.quantile(first, [0.1, 0.5, 0.9])])
    assert statistics[1].tolist() == pytest.approx(
        [image[1].mean(), image[1].std(), *np.quantile(image[1], [0.1, 0.5, 0.9])]
    )


# --- a scene without data -------------------------------------------------------------------------


EMPTY_SCENES = {
    "all nodata": lambda pixels: (np.zeros_like(pixels), {"nodata": 0}),
    "all NaN": lambda pixels: (np.full(pixels.shape, np.nan, np.float32), {}),
}


@pytest.mark.parametrize("command", ["adapt", "predict"])
@pytest.mark.parametrize("case", EMPTY_SCENES)
def test_a_scene_without_data_is_refused_before_any_work(
    command: str, case: str, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    pixels, profile = EMPTY_SCENES[case](read_pixels(scene_files.image))
    empty = write_like(scene_files, tmp_path / "empty.tif", pixels, **profile)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    more: list[str | Path] = ["--labels", scene_files.labels] if command == "adapt" else []
    model = "pixel" if command == "adapt" else trained_runs["pretrain"]
    result = invoke(
        command,
        "--model",
        model,
        "--image",
        empty,
        *more,
        "--out",
        outputs / "map.tif",
        "--probabilities",
        outputs / "probs.tif",
        "--device",
        "cpu",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: {empty}: holds no data: every pixel is nodata, NaN or +-inf\n"
    assert list(outputs.iterdir()) == []


# --- bands matched by name ------------------------------------------------------------------------


def s2_spelling(band: str) -> str:
    """Another common spelling of a Sentinel-2 band name: "B2" as "b02", "B8A" as "b08a"."""
    spelled = re.fullmatch(r"B(\d+)(A?)", band)
    assert spelled is not None, band
    number, suffix = spelled.groups()
    return f"b{int(number):02d}{suffix.lower()}"


def test_a_scene_with_named_bands_in_another_order_maps_as_in_the_model_order(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    """Both `predict` (the prediction windows) and `adapt` (its support windows, through the
    fine-tuning they drive) read the bands by name."""
    raw = read_pixels(scene_files.image)
    order = np.random.default_rng(1).permutation(len(S2_BANDS))
    scenes = {
        "ordered": write_like(scene_files, tmp_path / "ordered.tif", raw, descriptions=S2_BANDS, nodata=0),
        "shuffled": write_like(
            scene_files,
            tmp_path / "shuffled.tif",
            raw[order],
            nodata=0,
            descriptions=[s2_spelling(S2_BANDS[band]) for band in order],
        ),
    }
    maps = {}
    for name, image in scenes.items():
        predicted, adapted = tmp_path / f"{name}.predicted.tif", tmp_path / f"{name}.adapted.tif"
        result = invoke(
            "predict", "--model", trained_runs["pretrain"], "--image", image, "--out", predicted, "--device", "cpu"
        )
        assert result.exit_code == 0, result.output
        result = invoke(
            "adapt",
            "--model",
            trained_runs["maml"],
            "--image",
            image,
            "--labels",
            scene_files.labels,
            "--out",
            adapted,
            "--steps",
            "2",
            "--pick",
            "first",
            "--no-check",
            "--no-pixel",
            "--device",
            "cpu",
        )
        assert result.exit_code == 0, result.output
        maps[name] = read_band(predicted), read_band(adapted)
    for ordered, shuffled in zip(maps["ordered"], maps["shuffled"]):
        assert len(np.unique(ordered)) > 2
        np.testing.assert_array_equal(shuffled, ordered)


def test_a_scene_missing_a_named_band_is_refused_with_both_orders(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    names = [band if band != "B8A" else "B13" for band in S2_BANDS]
    image = write_like(
        scene_files, tmp_path / "renamed.tif", read_pixels(scene_files.image), descriptions=names, nodata=0
    )
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    commands: list[tuple[str, list[str | Path]]] = [("predict", []), ("adapt", ["--labels", scene_files.labels])]
    for command, more in commands:
        result = invoke(
            command,
            "--model",
            trained_runs["pretrain"],
            "--image",
            image,
            *more,
            "--out",
            outputs / "map.tif",
            "--device",
            "cpu",
        )
        assert result.exit_code == 1, result.output
        assert result.stderr == (
            f"error: {image}: has bands {', '.join(names)} (no band B8A); "
            f"the model needs {', '.join(S2_BANDS)}, in that order\n"
        )
    assert list(outputs.iterdir()) == []


def test_a_scene_with_generic_band_names_is_read_by_position(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    """Descriptions that name no band of the model ("Band 1", as many tools write) are no band
    order: the scene is read by position, as one without descriptions."""
    names = [f"Band {number}" for number in range(1, len(S2_BANDS) + 1)]
    image = write_like(
        scene_files, tmp_path / "generic.tif", read_pixels(scene_files.image), descriptions=names, nodata=0
    )
    maps = {}
    for name, scene in [("generic", image), ("plain", scene_files.image)]:
        result = invoke(
            "predict",
            "--model",
            trained_runs["pretrain"],
            "--image",
            scene,
            "--out",
            tmp_path / f"{name}-map.tif",
            "--device",
            "cpu",
        )
        assert result.exit_code == 0, result.output
        maps[name] = read_pixels(tmp_path / f"{name}-map.tif")
    np.testing.assert_array_equal(maps["generic"], maps["plain"])


# --- scale/offset tags ----------------------------------------------------------------------------


def test_only_the_tagged_bands_of_a_scene_are_rescaled():
    """Band 1 untagged (reflectance x 10000), band 2 tagged (raw x 1e-4 = reflectance): both 0.1234."""
    raw = np.full((2, 1, 1), 1234, dtype=np.uint16)
    scaled = readers.scale_image(raw, scales=[1.0, 1e-4], offsets=[0.0, 0.0])
    np.testing.assert_allclose(scaled.ravel(), [0.1234, 0.1234], rtol=1e-6)


TAGGED = {
    # dtype -> (scale, offset, raw nodata): raw * scale + offset is the reflectance
    "float32": (2e-4, -0.05, np.nan),
    "uint16": (1e-4, -0.1, 0),
    "int16": (1e-4, -0.1, -32768),
}


def tagged_scene(scene: SceneFiles, path: Path, dtype: str) -> Path:
    """The scene's uint16 reflectances x 10000 as `dtype` raw values with scale/offset tags."""
    scale, offset, nodata = TAGGED[dtype]
    reflectance = read_pixels(scene.image)
    raw = (reflectance / 10000 - offset) / scale
    raw = raw.astype(np.float32) if dtype == "float32" else np.round(raw).astype(dtype)
    assert np.array_equal(np.round((raw.astype(np.float64) * scale + offset) * 10000), reflectance)
    raw[:, ~scene_valid(scene.image)] = nodata
    count = len(raw)
    return write_like(scene, path, raw, nodata=nodata, scales=(scale,) * count, offsets=(offset,) * count)


@pytest.mark.parametrize("dtype", TAGGED)
def test_scale_offset_tags_give_the_map_of_the_equivalent_uint16_scene(
    dtype: str, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    image = tagged_scene(scene_files, tmp_path / f"{dtype}.tif", dtype)
    pixels = read_labels(scene_files.labels, scene_files.image, DFC10)
    for size in (32, 128):  # adapt's support and context windows
        tagged_windows, tagged_at = cut_windows(image, pixels, size)
        windows, at = cut_windows(scene_files.image, pixels, size)
        np.testing.assert_array_equal(tagged_at, at)
        np.testing.assert_array_equal(tagged_windows, windows)
    maps = {}
    for name, scene in [("uint16", scene_files.image), ("tagged", image)]:
        out, probabilities = tmp_path / f"{name}.map.tif", tmp_path / f"{name}.probs.tif"
        result = invoke(
            "predict",
            "--model",
            trained_runs["pretrain"],
            "--image",
            scene,
            "--out",
            out,
            "--probabilities",
            probabilities,
            "--device",
            "cpu",
        )
        assert result.exit_code == 0, result.output
        maps[name] = read_band(out), read_pixels(probabilities)
    np.testing.assert_array_equal(maps["tagged"][0], maps["uint16"][0])
    np.testing.assert_array_equal(maps["tagged"][1], maps["uint16"][1])
    assert len(np.unique(maps["tagged"][0])) > 2


def test_ingest_reads_a_tagged_patch_as_its_uint16_equivalent(scene_files: SceneFiles, tmp_path: Path):
    image = tagged_scene(scene_files, tmp_path / "int16.tif", "int16")
    np.testing.assert_array_equal(
        ClassFolders().read(SourceFile(image, class_id=0)).image,
        ClassFolders().read(SourceFile(scene_files.image, class_id=0)).image,
    )


# --- files that are not what they seem ------------------------------------------------------------


def test_discover_on_a_file_says_it_is_a_file(tmp_path: Path):
    path = tmp_path / "patches.tif"
    path.write_bytes(b"II*\x00")
    with pytest.raises(DataError, match=re.escape(f"{path}: is a file, not a folder")):
        ClassFolders().discover(path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nowhere'}: no such folder")):
        ClassFolders().discover(tmp_path / "nowhere")


def test_adapt_on_a_truncated_geotiff_names_the_file_and_writes_nothing(scene_files: SceneFiles, tmp_path: Path):
    image = write_like(
        scene_files,
        tmp_path / "truncated.tif",
        read_pixels(scene_files.image),
        nodata=0,
        tiled=True,
        blockxsize=16,
        blockysize=16,
    )
    os.truncate(image, image.stat().st_size // 2)
    with rasterio.open(image) as src:  # the header is whole: only reading the pixels fails
        assert src.count == len(S2_BANDS)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    result = invoke(
        "adapt",
        "--model",
        "pixel",
        "--image",
        image,
        "--labels",
        scene_files.labels,
        "--out",
        outputs / "map.tif",
        "--probabilities",
        outputs / "probs.tif",
        "--vector",
        outputs / "map.gpkg",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {image}: cannot be read, truncated or corrupt? (")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(outputs.iterdir()) == []
