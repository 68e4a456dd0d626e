"""Sliding-window prediction: seamless stitching, the input's grid, nodata, atomicity, bounded memory."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from benchmarks.predict_memory import measure_in_subprocess, whole_scene_bytes, write_large_scene
from geo.classes import ClassScheme, default_palette
from geo.errors import DataError
from geo.export import style_path
from geo.sample_data import write_geotiff
from geo.windows import blend_weights, predict_scene, softmax, window_batches, window_starts

SCHEME = ClassScheme("three", ("Forest", "Water", "Urban"), default_palette(3))
CRS_UTM = CRS.from_epsg(32631)
TRANSFORM = from_origin(600_000, 5_000_000, 10, 10)
LOGIT_WEIGHTS = np.array([[6.0, -6.0], [-6.0, 6.0], [0.0, 0.0]], dtype=np.float32)
LOGIT_BIAS = np.array([0.0, 0.0, 1.0], dtype=np.float32)[None, :, None, None]


def per_pixel_logits(batch: np.ndarray) -> np.ndarray:
    return np.einsum("kc,bchw->bkhw", LOGIT_WEIGHTS, batch) + LOGIT_BIAS


def per_pixel_model(batch: np.ndarray) -> np.ndarray:
    """A model that looks at each pixel alone, so the true answer does not depend on the windows."""
    return softmax(per_pixel_logits(batch))


def smooth_scene(path: Path, height: int, width: int, *, crs: CRS | None = CRS_UTM) -> np.ndarray:
    """Two smooth uint16 bands, a nodata (0) corner and one pixel nodata in one band only."""
    rows, cols = np.mgrid[:height, :width]
    image = np.stack([5000 + 4000 * np.sin(rows / 37 + cols / 53), 5000 + 4000 * np.cos(cols / 29 - rows / 61)])
    image = image.astype(np.uint16)
    image[:, :20, :30] = 0
    image[0, height - 1, width - 1] = 0
    write_geotiff(
        path,
        image,
        crs,
        TRANSFORM if crs else rasterio.Affine.identity(),
        nodata=0,
        tiled=True,
        blockxsize=128,
        blockysize=128,
    )
    return image


def expected_probabilities(image: np.ndarray) -> np.ndarray:
    scaled = np.clip(image, 0, 10000).astype(np.float32) / 10000
    return softmax(per_pixel_logits(scaled[None]))[0]


def test_windows_cover_each_axis_with_the_last_one_flush():
    for size, window, overlap in [
        (1000, 256, 64),
        (256, 256, 64),
        (100, 256, 64),
        (449, 64, 0),
        (448, 64, 16),
    ]:
        starts = window_starts(size, window, overlap)
        assert starts[0] == 0 and starts[-1] == max(0, size - window)
        assert all(0 < b - a <= window - overlap for a, b in itertools.pairwise(starts))


def test_blend_weights_of_neighbours_sum_to_one():
    window, overlap = 64, 16
    weights = blend_weights(window, overlap)
    assert weights.min() > 0
    stride = window - overlap
    tiled = np.zeros((3 * stride + overlap, 3 * stride + overlap), np.float32)
    for top in range(0, 3 * stride, stride):
        for left in range(0, 3 * stride, stride):
            tiled[top : top + window, left : left + window] += weights
    inner = tiled[overlap:-overlap, overlap:-overlap]
    np.testing.assert_allclose(inner, 1.0, atol=1e-6)


def test_prediction_reproduces_a_per_pixel_model_on_the_input_grid(tmp_path: Path):
    image = smooth_scene(tmp_path / "scene.tif", 333, 517)
    result = predict_scene(
        tmp_path / "scene.tif",
        per_pixel_model,
        tmp_path / "out" / "map.tif",
        scheme=SCHEME,
        window=96,
        overlap=24,
        batch_size=3,
        probabilities_path=tmp_path / "out" / "prob.tif",
    )
    expected = expected_probabilities(image)
    nodata = (image == 0).all(axis=0)
    with (
        rasterio.open(tmp_path / "scene.tif") as src,
        rasterio.open(result.classes) as classes,
        rasterio.open(result.probabilities) as probabilities,
    ):
        for out in (classes, probabilities):
            assert (out.crs, out.transform, out.width, out.height) == (
                src.crs,
                src.transform,
                src.width,
                src.height,
            )
        class_map = classes.read(1)
        stored = probabilities.read()
        assert probabilities.descriptions == SCHEME.names
        assert probabilities.dtypes[0] == "float32"
    assert result.georeferenced and result.valid_pixels == int((~nodata).sum())
    assert (class_map[nodata] == 255).all()
    assert class_map[-1, -1] != 255  # only one band is nodata there: still data
    np.testing.assert_array_equal(class_map[~nodata], expected.argmax(axis=0)[~nodata])
    np.testing.assert_allclose(stored[:, ~nodata], expected[:, ~nodata], atol=1e-5)
    np.testing.assert_allclose(stored[:, ~nodata].sum(axis=0), 1.0, atol=1e-5)
    assert np.isnan(stored[:, nodata]).all()
    assert len(set(np.unique(class_map[~nodata]))) == 3  # the test scene exercises every class
    assert cog_validate(str(result.classes))[0] and cog_validate(str(result.probabilities))[0]


def test_confidence_is_the_shown_class_probability_on_the_grid_with_nodata_and_a_ramp_style(tmp_path: Path):
    image = smooth_scene(tmp_path / "scene.tif", 200, 260)
    result = predict_scene(
        tmp_path / "scene.tif",
        per_pixel_model,
        tmp_path / "out" / "map.tif",
        scheme=SCHEME,
        window=96,
        overlap=24,
        probabilities_path=tmp_path / "out" / "prob.tif",
        confidence_path=tmp_path / "out" / "confidence.tif",
    )
    nodata = (image == 0).all(axis=0)
    assert result.confidence is not None and result.probabilities is not None
    with (
        rasterio.open(tmp_path / "scene.tif") as src,
        rasterio.open(result.confidence) as confidence,
        rasterio.open(result.probabilities) as probabilities,
        rasterio.open(result.classes) as classes,
    ):
        assert (confidence.crs, confidence.transform, confidence.shape) == (src.crs, src.transform, src.shape)
        assert confidence.count == 1 and confidence.dtypes[0] == "float32" and np.isnan(confidence.nodata)
        assert "probability of the class it shows" in confidence.descriptions[0]
        shown = confidence.read(1)
        stored, class_map = probabilities.read(), classes.read(1)
    assert np.isnan(shown[nodata]).all() and np.isfinite(shown[~nodata]).all()
    rows, cols = np.nonzero(~nodata)
    np.testing.assert_array_equal(shown[~nodata], stored[class_map[rows, cols], rows, cols])
    assert shown[~nodata].min() >= 1 / 3 and shown[~nodata].max() <= 1  # 3 classes: never below a third
    assert cog_validate(str(result.confidence))[0]
    style = ET.parse(style_path(result.confidence)).getroot()
    shader = style.find(".//rasterrenderer[@type='singlebandpseudocolor']//colorrampshader")
    assert shader is not None and (shader.get("minimumValue"), shader.get("maximumValue")) == ("0.0", "1.0")
    assert result.style.exists()


@pytest.mark.parametrize("overlap, seamless", [(0, False), (32, True)])
def test_blending_hides_window_edges(tmp_path: Path, overlap: int, seamless: bool):
    """A model whose answer depends on the window (here: one constant per window) shows seams
    unless overlapping windows are blended."""
    smooth_scene(tmp_path / "scene.tif", 300, 300)
    calls = iter(range(10_000))

    def per_window_constant(batch: np.ndarray) -> np.ndarray:
        scores = np.zeros((batch.shape[0], 3, *batch.shape[2:]), np.float32)
        for item in scores:
            item[0] = 2.0 if next(calls) % 2 else -2.0
        return softmax(scores)

    result = predict_scene(
        tmp_path / "scene.tif",
        per_window_constant,
        tmp_path / "map.tif",
        scheme=SCHEME,
        window=64,
        overlap=overlap,
        batch_size=4,
        probabilities_path=tmp_path / "prob.tif",
    )
    with rasterio.open(result.probabilities) as src:
        forest = src.read(1)[30:, 40:]  # away from the nodata corner
    biggest_step = max(np.abs(np.diff(forest, axis=0)).max(), np.abs(np.diff(forest, axis=1)).max())
    assert forest.max() - forest.min() > 0.5  # windows really disagree
    assert (biggest_step < 0.1) == seamless, biggest_step


def test_prediction_is_deterministic(tmp_path: Path):
    smooth_scene(tmp_path / "scene.tif", 200, 150)
    digests = []
    for run in range(2):
        result = predict_scene(
            tmp_path / "scene.tif",
            per_pixel_model,
            tmp_path / f"map{run}.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            probabilities_path=tmp_path / f"prob{run}.tif",
        )
        assert result.probabilities is not None
        digests.append(
            [hashlib.sha256(path.read_bytes()).hexdigest() for path in (result.classes, result.probabilities)]
        )
    assert digests[0] == digests[1]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_scene_smaller_than_a_window_without_crs(tmp_path: Path):
    image = smooth_scene(tmp_path / "scene.tif", 40, 70, crs=None)
    result = predict_scene(
        tmp_path / "scene.tif",
        per_pixel_model,
        tmp_path / "map.tif",
        scheme=SCHEME,
        window=128,
        overlap=32,
    )
    assert not result.georeferenced
    with rasterio.open(result.classes) as src:
        assert (src.crs, src.width, src.height) == (None, 70, 40)
        assert src.transform == rasterio.Affine.identity()
        class_map = src.read(1)
    valid = ~(image == 0).all(axis=0)
    np.testing.assert_array_equal(class_map[valid], expected_probabilities(image).argmax(axis=0)[valid])


def stage_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("predict_scene-")]


@pytest.mark.parametrize("pipelined", [True, False])
def test_a_failure_midway_leaves_no_output_and_no_temporary_file(tmp_path: Path, pipelined: bool):
    smooth_scene(tmp_path / "scene.tif", 300, 300)
    out = tmp_path / "out"
    calls = iter(range(100))

    def fails_on_third_batch(batch: np.ndarray) -> np.ndarray:
        if next(calls) == 2:
            raise RuntimeError("out of GPU memory")
        return per_pixel_model(batch)

    with pytest.raises(RuntimeError, match="out of GPU memory"):
        predict_scene(
            tmp_path / "scene.tif",
            fails_on_third_batch,
            out / "map.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            batch_size=2,
            probabilities_path=out / "prob.tif",
            pipelined=pipelined,
        )
    assert list(out.iterdir()) == []
    assert stage_threads() == []


def test_wrong_model_output_and_unreadable_image_are_reported(tmp_path: Path):
    smooth_scene(tmp_path / "scene.tif", 100, 100)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 64, 64\)"):
        predict_scene(
            tmp_path / "scene.tif",
            lambda batch: batch,
            tmp_path / "map.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            batch_size=2,
        )
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(DataError, match=r"broken\.tif"):
        predict_scene(tmp_path / "broken.tif", per_pixel_model, tmp_path / "map.tif", scheme=SCHEME)
    with pytest.raises(DataError, match="has 2 bands"):
        predict_scene(
            tmp_path / "scene.tif",
            per_pixel_model,
            tmp_path / "map.tif",
            scheme=SCHEME,
            bands=[1, 3],
        )
    assert not (tmp_path / "map.tif").exists()


def test_large_scene_peak_memory_stays_far_below_loading_it_whole(tmp_path: Path):
    """4096 x 4096 x 3 uint16, predicted in a fresh process: its RSS growth is a small fraction of
    what the whole scene with its float32 copy and scores would take."""
    scene = write_large_scene(tmp_path / "large.tif", 4096, bands=3)
    figures = measure_in_subprocess(scene, tmp_path / "out", model="linear", phases=("map",))
    growth = figures["map"]["rss_growth"]
    whole = whole_scene_bytes(4096, bands=3, probabilities=False)
    print(
        f"peak RSS {figures['map']['peak_rss'] / 2**20:.0f} MiB, growth {growth / 2**20:.0f} MiB, "
        f"whole scene {whole / 2**20:.0f} MiB, {figures['map']['megapixels_per_second']:.2f} Mpx/s"
    )
    assert growth < whole / 2.5
    assert not (tmp_path / "out" / "map").exists()  # the benchmark removes what it wrote


# --- the pipeline: threads give the same bytes, and every stage's failure reaches the caller ----


def neighbourhood_model(batch: np.ndarray) -> np.ndarray:
    """Probabilities that depend on each window's content around a pixel (a 9-px box mean per band), so
    windows disagree at their edges and the stitching shows in the probabilities."""
    padded = np.pad(batch, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="edge")
    summed = padded.cumsum(axis=2).cumsum(axis=3)
    summed = np.pad(summed, ((0, 0), (0, 0), (1, 0), (1, 0)))
    box = summed[:, :, 9:, 9:] - summed[:, :, :-9, 9:] - summed[:, :, 9:, :-9] + summed[:, :, :-9, :-9]
    return per_pixel_model(box / 81)


def record_rows_done(seen: list[int], rows_done: int, _rows: int) -> None:
    seen.append(rows_done)


def test_pipelined_prediction_writes_the_bytes_of_the_sequential_one(tmp_path: Path):
    """Also across layouts: a tiled scene is read a batch's columns at a time, one stored in rows a
    strip at a time."""
    image = smooth_scene(tmp_path / "tiled.tif", 333, 517)
    write_geotiff(tmp_path / "striped.tif", image, CRS_UTM, TRANSFORM, nodata=0)
    rows_done: dict[tuple[str, bool], list[int]] = {}
    digests = {}
    for layout, pipelined in itertools.product(("tiled", "striped"), (True, False)):
        out = tmp_path / f"{layout}-{pipelined}"
        rows_done[layout, pipelined] = []
        result = predict_scene(
            tmp_path / f"{layout}.tif",
            neighbourhood_model,
            out / "map.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            batch_size=3,
            probabilities_path=out / "prob.tif",
            progress=functools.partial(record_rows_done, rows_done[layout, pipelined]),
            pipelined=pipelined,
        )
        assert result.probabilities is not None
        digests[layout, pipelined] = [
            hashlib.sha256(path.read_bytes()).hexdigest() for path in (result.classes, result.probabilities)
        ]
    assert len({tuple(digest) for digest in digests.values()}) == 1, digests
    assert len({tuple(done) for done in rows_done.values()}) == 1 and rows_done["tiled", True][-1] == 333
    assert stage_threads() == []


def test_window_batches_are_what_the_model_is_fed(tmp_path: Path):
    smooth_scene(tmp_path / "scene.tif", 150, 200)
    fed: list[np.ndarray] = []

    def recording(batch: np.ndarray) -> np.ndarray:
        fed.append(batch.copy())
        return per_pixel_model(batch)

    predict_scene(
        tmp_path / "scene.tif", recording, tmp_path / "map.tif", scheme=SCHEME, window=64, overlap=16, batch_size=3
    )
    batches = list(window_batches(tmp_path / "scene.tif", window=64, overlap=16, batch_size=3))
    assert len(batches) == len(fed) == 3 * 2  # 3 rows of 4 windows, in batches of 3 and 1
    for given, read in zip(fed, batches):
        np.testing.assert_array_equal(given, read)


def test_nan_probabilities_midway_are_reported_from_the_writer_thread(tmp_path: Path):
    smooth_scene(tmp_path / "scene.tif", 300, 300)
    calls = iter(range(100))

    def nan_on_fifth_batch(batch: np.ndarray) -> np.ndarray:
        probabilities = per_pixel_model(batch)
        if next(calls) == 4:
            probabilities[0, :, 5, 7] = np.nan
        return probabilities

    with pytest.raises(ValueError, match="NaN or infinite probabilities"):
        predict_scene(
            tmp_path / "scene.tif",
            nan_on_fifth_batch,
            tmp_path / "out" / "map.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            batch_size=2,
            probabilities_path=tmp_path / "out" / "prob.tif",
        )
    assert list((tmp_path / "out").iterdir()) == []
    assert stage_threads() == []


@pytest.mark.parametrize("pipelined", [True, False])
def test_an_unreadable_window_midway_names_the_file_and_leaves_no_output(tmp_path: Path, pipelined: bool):
    """A truncated GeoTIFF opens and its first rows read; the reader fails further down."""
    image = tmp_path / "scene.tif"
    smooth_scene(image, 400, 300)
    os.truncate(image, int(image.stat().st_size * 0.6))
    batches = iter(range(100))

    def counting(batch: np.ndarray) -> np.ndarray:
        next(batches)
        return per_pixel_model(batch)

    with pytest.raises(DataError, match=r"scene\.tif: cannot be read, truncated or corrupt") as error:
        predict_scene(
            image,
            counting,
            tmp_path / "out" / "map.tif",
            scheme=SCHEME,
            window=64,
            overlap=16,
            batch_size=2,
            probabilities_path=tmp_path / "out" / "prob.tif",
            pipelined=pipelined,
        )
    assert error.value.path == str(image)
    assert next(batches) > 0  # the first strips were read and predicted
    assert list((tmp_path / "out").iterdir()) == []
    assert stage_threads() == []
