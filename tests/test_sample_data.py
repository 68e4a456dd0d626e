"""The generator writes the real layouts, is deterministic, and carries the few-shot structure."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from PIL import Image
from scipy import ndimage
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from geo import sample_data
from geo.classes import DEEPGLOBE, DFC10, EUROSAT_CLASSES, IGBP_TO_DFC10
from geo.index import read_index
from pipeline.cli import app

SEN12MS_NAME = re.compile(r"(ROIs\d{4}_[a-z]+)/(s1|s2|lc)_(\d+)/\1_\2_\3_p\d+\.tif$")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("write", "options"),
    [
        (sample_data.write_sen12ms, {"regions": 2, "size": 16, "patches_per_region": 4}),
        (sample_data.write_deepglobe, {"regions": 2, "size": 64, "images_per_region": 2}),
        (sample_data.write_eurosat, {"regions": 2, "size": 32, "patches_per_class": 1}),
        (lambda out, **options: sample_data.write_scene(out, **options).image.parent, {"size": 64}),
    ],
    ids=["sen12ms", "deepglobe", "eurosat", "scene"],
)
def test_same_seed_writes_the_same_bytes(write, options: dict, tmp_path: Path) -> None:
    first = _tree(write(tmp_path / "a", seed=3, **options))
    again = _tree(write(tmp_path / "b", seed=3, **options))
    other = _tree(write(tmp_path / "c", seed=4, **options))
    assert first and first == again
    assert first != other


def test_generate_writes_each_kind_with_overrides(tmp_path: Path) -> None:
    root = sample_data.generate("deepglobe", tmp_path / "dg", seed=0, regions=1, size=32)
    assert len(list(root.glob("*_sat.jpg"))) == 4  # 1 region x 4 images per region
    assert Image.open(next(root.glob("*_sat.jpg"))).size == (32, 32)
    scene = sample_data.generate("scene", tmp_path / "scene", seed=0, size=48)
    assert sorted(p.name for p in scene.iterdir()) == ["labels.gpkg", "scene.tif", "truth.tif"]


def test_generate_rejects_unknown_kind_and_regions_for_a_scene(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        sample_data.generate("landsat", tmp_path)
    with pytest.raises(ValueError, match="regions"):
        sample_data.generate("scene", tmp_path, regions=3)


def test_sen12ms_layout_dtypes_and_grids(sen12ms_root: Path) -> None:
    files = sorted(sen12ms_root.rglob("*.tif"))
    assert len(files) == 4 * 2 * 64 * 3
    assert all(SEN12MS_NAME.search(f.as_posix()) for f in files)
    expected = {"s2": (13, "uint16"), "s1": (2, "float32"), "lc": (4, "uint16")}
    crs_of_scene: dict[str, set[str]] = {}
    for path in files[::37]:
        named = SEN12MS_NAME.search(path.as_posix())
        assert named is not None, path
        _season, kind, scene = named.groups()
        with rasterio.open(path) as src:
            assert (src.count, src.dtypes[0]) == expected[kind]
            assert (src.width, src.height) == (32, 32)
            assert src.res == (10.0, 10.0)
            assert 32601 <= src.crs.to_epsg() <= 32760
            crs_of_scene.setdefault(scene, set()).add(src.crs.to_string())
    assert all(len(crs) == 1 for crs in crs_of_scene.values())
    assert len({next(iter(crs)) for crs in crs_of_scene.values()}) == len(crs_of_scene)  # zones differ


def test_sen12ms_patches_abut_and_scenes_recur_in_two_seasons(sen12ms_root: Path) -> None:
    seasons_of: dict[str, set[str]] = {}
    for folder in sen12ms_root.glob("ROIs*/s2_*"):
        seasons_of.setdefault(folder.name, set()).add(folder.parent.name)
    assert len(seasons_of) == 4 and all(len(s) == 2 for s in seasons_of.values())

    scene_folder = sorted(sen12ms_root.glob("ROIs*/s2_*"))[0]
    name = scene_folder.parent.name + "_s2_" + scene_folder.name.removeprefix("s2_")
    with (
        rasterio.open(scene_folder / f"{name}_p0.tif") as left,
        rasterio.open(scene_folder / f"{name}_p1.tif") as right,
    ):
        assert right.bounds.left == left.bounds.right and right.bounds.top == left.bounds.top
    # same place in its other season: the same labels, other spectra
    scene = scene_folder.name.removeprefix("s2_")
    s2_files = sorted(sen12ms_root.glob(f"ROIs*/s2_{scene}/*_p5.tif"))
    lc_arrays, s2_arrays = [], []
    for s2 in s2_files:
        with (
            rasterio.open(s2) as a,
            rasterio.open(str(s2).replace("/s2_", "/lc_").replace("_s2_", "_lc_")) as b,
        ):
            s2_arrays.append(a.read())
            lc_arrays.append(b.read())
    assert np.array_equal(*lc_arrays)
    assert not np.array_equal(*s2_arrays)


def test_every_igbp_code_and_class_occurs_with_plausible_lccs(sen12ms_root: Path) -> None:
    codes: Counter[int] = Counter()
    for path in sorted(sen12ms_root.glob("*/lc_*/*.tif"))[::3]:
        with rasterio.open(path) as src:
            lc = src.read()
        codes.update(np.unique(lc[0]).tolist())
        assert lc[1:].min() >= 1 and lc[1:].max() <= 51  # LCCS codes
    assert set(codes) == set(range(1, 18))
    assert set(IGBP_TO_DFC10[list(codes)]) == set(range(DFC10.num_classes))


def test_each_scene_has_four_well_stocked_classes(sen12ms_index: Path) -> None:
    frame, _ = read_index(sen12ms_index)
    for scene, rows in frame.groupby("scene"):
        counts = rows["majority_class"].value_counts()
        assert (counts >= 16).sum() >= 4, (scene, counts.to_dict())


def _pixels(frame, rng: np.random.Generator, per_region: int = 3000) -> dict[tuple[str, str], tuple]:
    """A sample of (spectrum, class) pixels of each (season, scene) region."""
    from geo.readers import load_tile
    from geo.sources.sen12ms import Sen12ms

    regions = {}
    for key, rows in frame.groupby(["season", "scene"]):
        tiles = [load_tile(row, Sen12ms()) for _, row in rows.iloc[::4].iterrows()]
        x = np.concatenate([t.image.reshape(13, -1).T for t in tiles])
        y = np.concatenate([t.mask.ravel() for t in tiles])
        pick = rng.choice(len(y), min(per_region, len(y)), replace=False)
        regions[key] = (x[pick], y[pick])
    return regions


def _nearest_centroid(x: np.ndarray, y: np.ndarray, centroids: dict[int, np.ndarray]) -> float:
    classes = np.array(sorted(centroids))
    table = np.stack([centroids[c] for c in classes])
    predicted = classes[np.argmin(((x[:, None] - table[None]) ** 2).sum(-1), axis=1)]
    return float((predicted == y).mean())


def _few_shot_and_pooled(frame) -> tuple[float, float]:
    """Mean accuracy over regions of nearest-centroid pixel classifiers on the region's classes:
    centroids from 5 labelled pixels of the region, or pooled from all other scenes."""
    rng = np.random.default_rng(0)
    regions = _pixels(frame, rng)
    local, pooled = [], []
    for (_, scene), (x, y) in regions.items():
        classes = np.unique(y)
        shots = {c: x[rng.choice(np.flatnonzero(y == c), 5, replace=False)].mean(0) for c in classes}
        local.append(_nearest_centroid(x, y, shots))
        others = [v for (_, other), v in regions.items() if other != scene]
        ox, oy = np.concatenate([v[0] for v in others]), np.concatenate([v[1] for v in others])
        centroids = {c: ox[oy == c].mean(0) for c in classes if (oy == c).any()}
        pooled.append(_nearest_centroid(x, y, centroids) if len(centroids) == len(classes) else 0.0)
    return float(np.mean(local)), float(np.mean(pooled))


def test_classes_separate_within_a_region_but_shift_across_regions(sen12ms_index: Path) -> None:
    frame, _ = read_index(sen12ms_index)
    local, pooled = _few_shot_and_pooled(frame)
    assert local >= 0.85
    assert pooled <= local - 0.2


def test_region_shift_strength_is_what_pooling_trips_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.ingest import ingest

    def pooled_accuracy(name: str) -> float:
        root = sample_data.write_sen12ms(tmp_path / name, seed=0, regions=4, size=16, patches_per_region=16)
        frame, _ = read_index(ingest("sen12ms", root, tmp_path / f"{name}.parquet", progress=False).out)
        return _few_shot_and_pooled(frame)[1]

    shifted = pooled_accuracy("shifted")
    flat = replace(sample_data.DIFFICULTIES["default"], region_shift=0.0)
    monkeypatch.setitem(sample_data.DIFFICULTIES, "default", flat)
    assert pooled_accuracy("flat") >= shifted + 0.1


def test_spectra_look_like_their_classes() -> None:
    forest, urban, snow, water = (DFC10.class_id(n) for n in ("Forest", "Urban/Built-up", "Snow/Ice", "Water"))
    bands = {
        name: i
        for i, name in enumerate(("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"))
    }
    sig = sample_data.S2_SIGNATURES
    assert sig[forest, bands["B8"]] > 5 * sig[forest, bands["B4"]]  # red edge
    assert sig[water, bands["B8"]] < 0.02
    assert sig[snow, bands["B3"]] > 10 * sig[snow, bands["B11"]]  # bright visible, dark SWIR
    assert np.ptp(sig[urban, :9]) < 0.1  # flat
    summer, winter = (sample_data.season_signatures(s) for s in ("ROIs1868_summer", "ROIs2017_winter"))
    assert summer[forest, bands["B8"]] > winter[forest, bands["B8"]]


def test_deepglobe_layout_and_colours(deepglobe_root: Path) -> None:
    images = sorted(deepglobe_root.glob("*_sat.jpg"))
    assert len(images) == 12 and all(re.fullmatch(r"\d{6}_sat\.jpg", p.name) for p in images)
    with (
        Image.open(images[0]) as sat,
        Image.open(images[0].with_name(images[0].name.replace("_sat.jpg", "_mask.png"))) as mask,
    ):
        assert sat.format == "JPEG" and sat.mode == "RGB" and sat.size == (128, 128)
        colours = np.asarray(mask).reshape(-1, 3)
    assert not np.isin(colours, (0, 255)).all()  # jittered, like the release
    assert ((colours < 16) | (colours > 239)).all()  # ... by a few values only
    snapped = {tuple(int(v) for v in c) for c in np.where(colours >= 128, 255, 0)}
    assert snapped <= set(DEEPGLOBE.colors) | {(0, 0, 0)}
    assert (0, 0, 0) in snapped  # a little Unknown


def test_kmeans_on_image_statistics_recovers_deepglobe_regions(deepglobe_root: Path) -> None:
    truth = sample_data.deepglobe_regions(seed=0, regions=3, images_per_region=4)  # conftest
    features, regions = [], []
    for path in sorted(deepglobe_root.glob("*_sat.jpg")):
        pixels = np.asarray(Image.open(path)).reshape(-1, 3) / 255
        features.append(np.concatenate([pixels.mean(0), pixels.std(0), *np.quantile(pixels, [0.1, 0.5, 0.9], axis=0)]))
        regions.append(truth[path.name.removesuffix("_sat.jpg")])
    z = np.array(features)
    z = (z - z.mean(0)) / z.std(0)
    found = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(regions, found) == pytest.approx(1.0)


def test_eurosat_layout(eurosat_root: Path) -> None:
    assert sorted(p.name for p in eurosat_root.iterdir()) == sorted(EUROSAT_CLASSES)
    zones = set()
    for name in EUROSAT_CLASSES:
        patches = sorted((eurosat_root / name).glob("*.tif"))
        assert [p.name for p in patches] == sorted(f"{name}_{n}.tif" for n in range(1, 5))
        with rasterio.open(patches[0]) as src:
            assert (src.count, src.dtypes[0], src.width, src.height) == (13, "uint16", 64, 64)
            zones.add(src.crs.to_epsg())
    assert len(zones) == 3


def test_scene_files(scene_files: sample_data.SceneFiles) -> None:
    with rasterio.open(scene_files.image) as image, rasterio.open(scene_files.truth) as truth:
        assert (image.count, image.dtypes[0], image.nodata, image.width) == (13, "uint16", 0, 128)
        assert (truth.dtypes[0], truth.nodata) == ("uint8", 255)
        assert truth.transform == image.transform and truth.crs == image.crs
        assert 32601 <= image.crs.to_epsg() <= 32760
        pixels, labels = image.read(), truth.read(1)
    nodata = (pixels == 0).all(axis=0)
    assert 0.01 < nodata.mean() < 0.2
    assert np.array_equal(nodata, labels == 255)
    assert not (pixels[:, ~nodata] == 0).any()
    points = gpd.read_file(scene_files.labels)
    assert points.crs.to_epsg() == 4326
    present = {DFC10.names[c] for c in np.unique(labels[labels != 255])}
    assert set(points["class"]) == present and 4 <= len(present) <= 6
    assert points["class"].value_counts().eq(5).all()
    # every point lies on a pixel of its class
    utm = points.to_crs(image.crs)
    rows, cols = rasterio.transform.rowcol(image.transform, utm.geometry.x, utm.geometry.y)
    assert [DFC10.names[labels[r, c]] for r, c in zip(rows, cols)] == list(points["class"])


# --- difficulty -------------------------------------------------------------------------------

DEFAULT_DIGEST = "5542775087ec6fbfc2c06a8eb1f576f618ad33ad97425b65e278999f7bf8919c"
"""sha256 of the pixels `_pixel_digest` reads, written by the generator before difficulties
existed: the default preset must keep every seed's data as it was (a numpy release that changes
its random streams would change it too)."""


def _pixel_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.tif")):
        with rasterio.open(path) as src:
            digest.update(path.name.encode())
            digest.update(src.read().tobytes())
    return digest.hexdigest()


def test_default_difficulty_writes_what_the_generator_always_wrote(tmp_path: Path) -> None:
    sample_data.write_scene(tmp_path / "scene", seed=0, size=32)
    sample_data.write_sen12ms(tmp_path / "sen12ms", seed=0, regions=1, size=16, patches_per_region=1)
    sample_data.write_eurosat(tmp_path / "eurosat", seed=0, regions=1, size=16, patches_per_class=1)
    assert _pixel_digest(tmp_path) == DEFAULT_DIGEST


@pytest.mark.parametrize(
    ("write", "options"),
    [
        (sample_data.write_sen12ms, {"regions": 1, "size": 16, "patches_per_region": 2}),
        (sample_data.write_deepglobe, {"regions": 1, "size": 32, "images_per_region": 1}),
        (sample_data.write_eurosat, {"regions": 1, "size": 16, "patches_per_class": 1}),
        (lambda out, **options: sample_data.write_scene(out, **options).image.parent, {"size": 48}),
    ],
    ids=["sen12ms", "deepglobe", "eurosat", "scene"],
)
def test_difficulty_default_is_the_default_and_hard_is_deterministic(write, options: dict, tmp_path: Path) -> None:
    implicit = _tree(write(tmp_path / "implicit", seed=2, **options))
    explicit = _tree(write(tmp_path / "explicit", seed=2, difficulty="default", **options))
    hard = _tree(write(tmp_path / "hard", seed=2, difficulty="hard", **options))
    hard_again = _tree(write(tmp_path / "hard_again", seed=2, difficulty="hard", **options))
    assert implicit and implicit == explicit
    assert hard == hard_again
    # the same files and labels (same random draws), other images
    assert hard.keys() == implicit.keys()
    for name in hard:
        is_label = any(part in name for part in ("lc_", "_mask.png", "labels.gpkg", "truth.tif"))
        assert (hard[name] == implicit[name]) == is_label, name


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reflectance (13, H, W) and truth of one place in each difficulty: same seed, same map."""
    loaded = {}
    for difficulty in ("default", "hard"):
        files = sample_data.write_scene(tmp_path_factory.mktemp(difficulty), seed=0, size=128, difficulty=difficulty)
        with rasterio.open(files.image) as image, rasterio.open(files.truth) as truth:
            loaded[difficulty] = (image.read().astype(np.float64) / 10000, truth.read(1))
    return loaded


def _pixel_accuracy(image: np.ndarray, truth: np.ndarray) -> float:
    """Nearest class mean per pixel (standardised bands), the means taken from the truth: how
    far apart the classes are, whatever a few labels would find."""
    valid = truth != 255
    x, y = image[:, valid].T, truth[valid]
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    distance = (((x[:, None] - means[None]) / x.std(0)) ** 2).sum(-1)
    return float((classes[distance.argmin(1)] == y).mean())


def test_hard_classes_overlap_per_pixel_but_separate_in_a_neighbourhood(scenes: dict) -> None:
    assert np.array_equal(scenes["default"][1], scenes["hard"][1])
    default, hard = (_pixel_accuracy(*scenes[name]) for name in ("default", "hard"))
    assert default >= 0.95
    assert hard <= default - 0.15
    image, truth = scenes["hard"]
    neighbourhood = ndimage.uniform_filter(image, size=(1, 5, 5), mode="nearest")
    assert _pixel_accuracy(neighbourhood, truth) >= hard + 0.05  # solvable with context


def _boundary_position(image: np.ndarray, truth: np.ndarray) -> float:
    """Mean position of the pixels of class a touching class b on the line from a's mean (0) to
    b's mean (1), means taken well inside the classes: 0 for pure pixels, up to 0.5 for mixed."""
    classes = [c for c in np.unique(truth) if c != 255]
    inside = {c: image[:, ndimage.binary_erosion(truth == c, iterations=4)].mean(1) for c in classes}
    positions = []
    for a in classes:
        for b in classes:
            edge = (truth == a) & ndimage.binary_dilation(truth == b)
            if a == b or edge.sum() < 20:
                continue
            direction = inside[b] - inside[a]
            positions.append((image[:, edge].T - inside[a]) @ direction / (direction @ direction))
    return float(np.concatenate(positions).mean())


def test_hard_pixels_along_boundaries_are_mixtures(scenes: dict) -> None:
    assert abs(_boundary_position(*scenes["default"])) < 0.1
    assert _boundary_position(*scenes["hard"]) > 0.25


def test_unknown_difficulty_is_refused(tmp_path: Path) -> None:
    for write in (
        sample_data.write_sen12ms,
        sample_data.write_deepglobe,
        sample_data.write_eurosat,
        sample_data.write_scene,
    ):
        with pytest.raises(ValueError, match=r"unknown difficulty 'extreme'.*default, hard"):
            write(tmp_path / "out", difficulty="extreme")
    with pytest.raises(ValueError, match="default, hard"):
        sample_data.generate("scene", tmp_path / "out", difficulty="extreme")
    assert not (tmp_path / "out").exists()


def test_cli_sample_data_difficulty(tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["sample-data", "--kind", "scene", "--size", "32"]
    wrong = runner.invoke(app, [*common, str(tmp_path / "x"), "--difficulty", "extreme"])
    assert wrong.exit_code == 2 and "'default', 'hard'" in wrong.output
    assert not (tmp_path / "x").exists()
    made = runner.invoke(app, [*common, str(tmp_path / "hard"), "--difficulty", "hard"])
    assert made.exit_code == 0, made.output
    expected = sample_data.write_scene(tmp_path / "direct", seed=0, size=32, difficulty="hard")
    assert _tree(tmp_path / "hard") == _tree(expected.image.parent)
