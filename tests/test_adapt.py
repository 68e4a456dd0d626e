"""`landcover adapt` / `landcover predict` end to end on the generated new-region scene.

Real files and the session's tiny trained runs, through the CLI: GIS-ready outputs on the scene's
grid, the adapted model reproducing its map, determinism, labels by id and in any CRS, every bad
input refused with nothing written. Which candidate maps a scene better is a race measured in
`benchmarks/adapt_scenes.py` over several seeds, not asserted here.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate
from typer.testing import CliRunner

from geo.classes import DFC10
from geo.export import CLASS_NAMES_TAG, CLASS_SCHEME_TAG
from geo.labels import read_labels
from geo.sample_data import SceneFiles, write_geotiff
from pipeline.adapt import MapConfig, predict_map, support_windows
from pipeline.cli import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(arg) for arg in args])


@dataclass(frozen=True)
class Adapted:
    """One `landcover adapt` of the MAML run on the scene, with every optional output."""

    folder: Path
    map: Path
    probabilities: Path
    vector: Path
    model: Path
    output: str


def adapt_args(run: Path, scene: SceneFiles, out: Path, *more: str | Path) -> list[str | Path]:
    return [
        "adapt",
        "--model",
        run,
        "--image",
        scene.image,
        "--labels",
        scene.labels,
        "--out",
        out,
        "--device",
        "cpu",
        "--seed",
        "0",
        *more,
    ]


@pytest.fixture(scope="module")
def adapted(trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path_factory) -> Adapted:
    folder = tmp_path_factory.mktemp("adapted")
    made = Adapted(folder, folder / "map.tif", folder / "probs.tif", folder / "map.gpkg", folder / "model", "")
    result = invoke(
        *adapt_args(
            trained_runs["maml"],
            scene_files,
            made.map,
            "--probabilities",
            made.probabilities,
            "--vector",
            made.vector,
            "--save-adapted",
            made.model,
        )
    )
    assert result.exit_code == 0, result.output
    return Adapted(**{**made.__dict__, "output": result.output})


@pytest.fixture(scope="module")
def labelled_ids(scene_files: SceneFiles) -> set[int]:
    names = gpd.read_file(scene_files.labels)["class"]
    return {DFC10.names.index(name) for name in names}


def read_band(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def scene_valid(scene: SceneFiles) -> np.ndarray:
    with rasterio.open(scene.image) as src:
        return src.dataset_mask() > 0


def accuracy(map_path: Path, truth_path: Path) -> float:
    predicted, truth = read_band(map_path), read_band(truth_path)
    scored = truth != 255
    return float((predicted[scored] == truth[scored]).mean())


# --- the outputs ----------------------------------------------------------------------------------


def test_map_is_a_valid_cog_on_the_scene_grid_with_colours_and_names(adapted: Adapted, scene_files: SceneFiles):
    is_cog, errors, _ = cog_validate(str(adapted.map))
    assert is_cog, errors
    with rasterio.open(scene_files.image) as scene, rasterio.open(adapted.map) as src:
        assert (src.crs, src.transform, src.width, src.height) == (
            scene.crs,
            scene.transform,
            scene.width,
            scene.height,
        )
        assert src.count == 1 and src.dtypes == ("uint8",) and src.nodata == 255
        assert src.profile["tiled"]
        classes = src.read(1)
        colormap = src.colormap(1)
        tags = src.tags()
    assert json.loads(tags[CLASS_NAMES_TAG]) == list(DFC10.names)
    assert tags[CLASS_SCHEME_TAG] == "dfc10"
    for class_id, color in enumerate(DFC10.colors):
        assert colormap[class_id] == (*color, 255)
    assert colormap[255][3] == 0  # nodata transparent
    valid = scene_valid(scene_files)
    assert (~valid).any() and valid.any()
    np.testing.assert_array_equal(classes == 255, ~valid)  # 255 exactly where the scene has no data


def test_qml_is_a_paletted_style_with_one_entry_per_class(adapted: Adapted):
    style = adapted.map.with_suffix(".qml")
    assert f"style {style}" in adapted.output
    root = ET.parse(style).getroot()
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer is not None and renderer.get("type") == "paletted" and renderer.get("band") == "1"
    entries = renderer.findall("colorPalette/paletteEntry")
    assert [int(entry.attrib["value"]) for entry in entries] == list(range(DFC10.num_classes))
    assert [entry.get("label") for entry in entries] == list(DFC10.names)
    assert [entry.get("color") for entry in entries] == [
        f"#{red:02x}{green:02x}{blue:02x}" for red, green, blue in DFC10.colors
    ]


def test_map_uses_only_the_labelled_classes(adapted: Adapted, labelled_ids: set[int]):
    used = set(np.unique(read_band(adapted.map)).tolist()) - {255}
    assert used and used <= labelled_ids
    listed = adapted.output.split("classes: ", 1)[1].splitlines()[0]
    assert listed == ", ".join(DFC10.names[class_id] for class_id in sorted(labelled_ids))
    assert "adapted on 25 labelled pixels" in adapted.output


def test_probabilities_have_a_band_per_class_and_sum_to_one(
    adapted: Adapted, scene_files: SceneFiles, labelled_ids: set[int]
):
    assert cog_validate(str(adapted.probabilities))[0]
    with rasterio.open(adapted.probabilities) as src, rasterio.open(adapted.map) as classes:
        assert src.count == DFC10.num_classes and src.dtypes[0] == "float32"
        assert src.descriptions == DFC10.names
        assert (src.crs, src.transform, src.shape) == (classes.crs, classes.transform, classes.shape)
        probabilities = src.read()
        class_map = classes.read(1)
    valid = scene_valid(scene_files)
    np.testing.assert_allclose(probabilities[:, valid].sum(axis=0), 1.0, atol=1e-4)
    assert np.isnan(probabilities[:, ~valid]).all()
    unlabelled = sorted(set(range(DFC10.num_classes)) - labelled_ids)
    assert (probabilities[unlabelled][:, valid] == 0).all()
    np.testing.assert_array_equal(probabilities[:, valid].argmax(axis=0), class_map[valid])


def test_vector_holds_named_polygons_in_the_scene_crs(adapted: Adapted, scene_files: SceneFiles):
    polygons = gpd.read_file(adapted.vector, layer="classes")
    with rasterio.open(scene_files.image) as scene:
        crs, pixel_area = scene.crs, abs(scene.transform.a * scene.transform.e)
    assert polygons.crs == crs
    class_map = read_band(adapted.map)
    assert set(polygons["class_id"]) == set(np.unique(class_map).tolist()) - {255}
    assert (polygons["class_name"] == [DFC10.names[class_id] for class_id in polygons["class_id"]]).all()
    for class_id, group in polygons.groupby("class_id"):  # the polygons cover exactly the map's pixels
        assert group.area.sum() == pytest.approx((class_map == class_id).sum() * pixel_area)


def test_saved_adapted_model_predicts_the_same_map(adapted: Adapted, scene_files: SceneFiles, tmp_path: Path):
    assert f"adapted model: {adapted.model}" in adapted.output
    config = json.loads((adapted.model / "config.json").read_text())
    assert config["settings"]["adapted_classes"] == sorted(
        DFC10.names.index(name) for name in set(gpd.read_file(scene_files.labels)["class"])
    )
    out = tmp_path / "predicted.tif"
    result = invoke("predict", "--model", adapted.model, "--image", scene_files.image, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == adapted.map.read_bytes()
    assert out.with_suffix(".qml").read_text() == adapted.map.with_suffix(".qml").read_text()


def test_same_seed_same_class_raster(
    adapted: Adapted, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    again = tmp_path / "again.tif"
    result = invoke(*adapt_args(trained_runs["maml"], scene_files, again))
    assert result.exit_code == 0, result.output
    assert again.read_bytes() == adapted.map.read_bytes()


def test_labels_by_class_id_in_another_crs_give_the_same_map(
    adapted: Adapted, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    """Points at pixel centres, as ids in Web Mercator: the same pixels, the same classes."""
    labels = gpd.read_file(scene_files.labels)
    ids = gpd.GeoDataFrame(
        {"code": [DFC10.names.index(name) for name in labels["class"]]}, geometry=labels.geometry, crs=labels.crs
    ).to_crs("EPSG:3857")
    path = tmp_path / "ids.geojson"
    ids.to_file(path, driver="GeoJSON")
    out = tmp_path / "by-id.tif"
    result = invoke(
        "adapt",
        "--model",
        trained_runs["maml"],
        "--image",
        scene_files.image,
        "--labels",
        path,
        "--class-column",
        "code",
        "--out",
        out,
        "--device",
        "cpu",
        "--seed",
        "0",
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_band(out), read_band(adapted.map))


def test_labels_on_nodata_are_ignored_and_reported(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    labels = gpd.read_file(scene_files.labels)
    with rasterio.open(scene_files.image) as src:
        x, y = src.xy(src.height - 1, 0)  # bottom-left corner: inside the nodata swath edge
        crs = src.crs
        assert src.dataset_mask()[src.height - 1, 0] == 0
    extra = gpd.GeoDataFrame({"class": ["Snow/Ice"]}, geometry=gpd.points_from_xy([x], [y]), crs=crs)
    path = tmp_path / "with-nodata.gpkg"
    gpd.pd.concat([labels, extra.to_crs(labels.crs)]).to_file(path, layer="labels")
    out = tmp_path / "map.tif"
    result = invoke(
        "adapt",
        "--model",
        trained_runs["maml"],
        "--image",
        scene_files.image,
        "--labels",
        path,
        "--out",
        out,
        "--steps",
        "0",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    assert "1 labelled pixels lie on the scene's nodata" in result.output
    assert "Snow/Ice" not in result.output.split("classes: ", 1)[1]  # its only label was ignored


# --- bad inputs: a clear error naming the file, exit 1, nothing written ------------------------------


def _scene_with_bands(scene: SceneFiles, path: Path, count: int) -> Path:
    with rasterio.open(scene.image) as src:
        write_geotiff(path, src.read(list(range(1, count + 1))), src.crs, src.transform, nodata=0)
    return path


def _labels(scene: SceneFiles, path: Path, edit) -> Path:
    frame = edit(gpd.read_file(scene.labels))
    frame.to_file(path, layer="labels")
    return path


def _garbage(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _broken_run(run: Path, folder: Path) -> Path:
    broken = folder / "broken-run"
    broken.mkdir()
    shutil.copy(run / "config.json", broken / "config.json")
    _garbage(broken / "weights.pt", b"truncated")
    return broken


def _move_one(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """One label a degree east, beyond the scene; the others stay."""
    moved = frame.geometry.translate(xoff=1.0)
    return frame.set_geometry(moved.where(frame.index == 3, frame.geometry))


BAD_INPUTS = {
    # case -> (scene, run, folder) -> (the option given a bad file, the file, what the message must say)
    "unknown class names": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "typo.gpkg", lambda f: f.assign(**{"class": f["class"].replace("Forest", "Forrest")})),
        ["unknown class name", "Forrest", "valid classes of dfc10: " + ", ".join(DFC10.names)],
    ),
    "labels outside the scene": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "moved.gpkg", lambda f: f.set_geometry(f.translate(xoff=0.5))),
        ["25 of 25 labels fall outside the scene", "check the labels' CRS"],
    ),
    "one label outside the scene": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "one-moved.gpkg", _move_one),
        ["1 of 25 labels fall outside the scene"],
    ),
    "scene band count differs from the model": lambda scene, run, folder: (
        "image",
        _scene_with_bands(scene, folder / "four-bands.tif", 4),
        ["has 4 bands but the model was trained on 13 (B1, B2"],
    ),
    "empty labels file": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "empty.gpkg", lambda f: f.iloc[:0]),
        ["no labelled features"],
    ),
    "unreadable labels file": lambda scene, run, folder: (
        "labels",
        _garbage(folder / "garbage.gpkg", b"not a geopackage\n" * 10),
        ["cannot read the labels file"],
    ),
    "missing labels file": lambda scene, run, folder: (
        "labels",
        folder / "nowhere.gpkg",
        ["cannot read the labels file"],
    ),
    "unreadable scene": lambda scene, run, folder: (
        "image",
        _garbage(folder / "scene.tif", b"II*\x00 broken tiff"),
        ["cannot read the scene"],
    ),
    "class ids out of range": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "ids.gpkg", lambda f: f.assign(**{"class": 12})),
        ["class ids [12]", "out of range"],
    ),
    "missing class column": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "renamed.gpkg", lambda f: f.rename(columns={"class": "kind"})),
        ["has no class column 'class'", "kind"],
    ),
    "labels only on nodata": lambda scene, run, folder: (
        "labels",
        _labels(scene, folder / "on-nodata.gpkg", lambda f: _on_nodata(scene, f)),
        ["fall on nodata pixels"],
    ),
    "not a run directory": lambda scene, run, folder: ("model", folder, ["is not a run directory"]),
    "unreadable model": lambda scene, run, folder: (
        "model",
        _broken_run(run, folder),
        ["weights.pt: cannot be read as a checkpoint, truncated or corrupt?"],
    ),
}


def _on_nodata(scene: SceneFiles, frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    with rasterio.open(scene.image) as src:
        x, y = src.xy(src.height - 1, 0)
        crs = src.crs
    return gpd.GeoDataFrame({"class": ["Forest"]}, geometry=gpd.points_from_xy([x], [y]), crs=crs).to_crs(frame.crs)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_writes_nothing(
    case: str, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    option, bad_file, expected = BAD_INPUTS[case](scene_files, trained_runs["maml"], inputs)
    given = {"model": trained_runs["maml"], "image": scene_files.image, "labels": scene_files.labels, option: bad_file}
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    before = sorted(inputs.rglob("*"))
    result = invoke(
        "adapt",
        "--model",
        given["model"],
        "--image",
        given["image"],
        "--labels",
        given["labels"],
        "--out",
        outputs / "map.tif",
        "--probabilities",
        outputs / "probs.tif",
        "--vector",
        outputs / "map.gpkg",
        "--save-adapted",
        outputs / "model",
        "--device",
        "cpu",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith((f"error: {bad_file}: ", f"error: {bad_file}/")), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    for words in expected:
        assert words in result.stderr
    assert list(outputs.iterdir()) == []  # no map, style, probabilities, polygons, model or temporary file
    assert sorted(inputs.rglob("*")) == before


@pytest.mark.parametrize("case", ["scene band count differs from the model", "unreadable scene", "unreadable model"])
def test_predict_refuses_bad_inputs_and_writes_nothing(
    case: str, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    option, bad_file, expected = BAD_INPUTS[case](scene_files, trained_runs["pretrain"], tmp_path)
    given = {"model": trained_runs["pretrain"], "image": scene_files.image, option: bad_file}
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    result = invoke(
        "predict",
        "--model",
        given["model"],
        "--image",
        given["image"],
        "--out",
        outputs / "map.tif",
        "--probabilities",
        outputs / "probs.tif",
        "--vector",
        outputs / "map.gpkg",
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith((f"error: {bad_file}: ", f"error: {bad_file}/")) and expected[0] in result.stderr
    assert list(outputs.iterdir()) == []


def test_outputs_that_would_overwrite_an_input_or_each_other_are_refused(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    run = trained_runs["maml"]
    image = tmp_path / "scene.tif"
    shutil.copy(scene_files.image, image)
    original = image.read_bytes()
    cases: list[tuple[list[str | Path], str]] = [
        (["--out", image], "is the --image input"),
        (["--out", tmp_path / "map.tif", "--probabilities", tmp_path / "map.tif"], "both --out and --probabilities"),
        (["--out", tmp_path / "map.tif", "--vector", tmp_path / "map.qml"], "both --vector and the map's style"),
        (["--out", tmp_path / "map.tif", "--save-adapted", run], "is the --model run itself"),
    ]
    for options, message in cases:
        result = invoke("adapt", "--model", run, "--image", image, "--labels", scene_files.labels, *options)
        assert result.exit_code == 1 and message in result.stderr, result.output
    assert image.read_bytes() == original
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scene.tif"]
    result = invoke(
        "adapt",
        "--model",
        run,
        "--image",
        image,
        "--labels",
        scene_files.labels,
        "--out",
        tmp_path / "map.tif",
        "--device",
        "mps",
    )
    assert result.exit_code == 2 and "--device" in result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scene.tif"]


# --- pieces of the step -------------------------------------------------------------------------------


def test_support_windows_hold_each_labelled_pixel_once(scene_files: SceneFiles):
    """Windows of 48 px on a 128 px scene: the last cell's window moves back over its neighbour,
    which must not count the neighbour's labels twice."""
    pixels = read_labels(scene_files.labels, scene_files.image, DFC10)
    classes = np.unique(pixels.class_ids)
    images, labels = support_windows(scene_files.image, pixels, classes, 48)
    assert images.shape[1:] == (13, 48, 48) and images.dtype == np.float32 and labels.shape[1:] == (48, 48)
    assert int((labels != 255).sum()) == len(pixels) == 25
    counts = np.bincount(labels[labels != 255], minlength=len(classes))
    np.testing.assert_array_equal(counts, np.bincount(np.searchsorted(classes, pixels.class_ids)))


def test_a_window_larger_than_the_scene_maps_like_one_of_its_size(
    adapted: Adapted, scene_files: SceneFiles, tmp_path: Path
):
    """The 128 px scene is not zero-padded to the 256 px default window: padding would enter the
    per-window normalisation of the model and change every pixel's scores."""
    default = predict_map(adapted.model, scene_files.image, tmp_path / "default.tif", config=MapConfig(device="cpu"))
    fitted = predict_map(
        adapted.model,
        scene_files.image,
        tmp_path / "fitted.tif",
        config=MapConfig(window=128, overlap=32, device="cpu"),
    )
    np.testing.assert_array_equal(read_band(default.scene_map.classes), read_band(fitted.scene_map.classes))
    np.testing.assert_array_equal(read_band(default.scene_map.classes), read_band(adapted.map))


# --- candidates, the check on the user's labels, and its report ---------------------------------------


def test_adapt_cross_validates_every_candidate_and_maps_with_the_best(adapted: Adapted, scene_files: SceneFiles):
    """The default adapt: the run's fine-tuned and head variants and the pixel classifier, all scored
    on the same spatial folds of the labels; the map comes from the best, the report says so."""
    report = json.loads(adapted.map.with_name("map.report.json").read_text())
    names = [candidate["name"] for candidate in report["candidates"]]
    assert names == ["maml fine-tuned", "maml head", "pixel"]
    assert set(report["labels_per_class"].values()) == {5} and report["check"]["folds"] == 5
    estimates = {c["name"]: c["estimate"] for c in report["candidates"]}
    best = max(names, key=lambda name: estimates[name]["accuracy"])
    assert report["chosen"] == report["candidates"][names.index(best)]["name"] or (
        estimates[report["chosen"]]["accuracy"] == estimates[best]["accuracy"]
    )
    for estimate in estimates.values():
        assert estimate["held_out_labels"] == 25 and estimate["ci95"][0] <= estimate["accuracy"] <= estimate["ci95"][1]
        assert sum(map(sum, estimate["confusion"]["rows_true_columns_predicted"])) == 25
    markdown = adapted.map.with_name("map.report.md").read_text()
    assert f"The map was made by **{report['chosen']}**" in markdown and "| pixel |" in markdown
    assert f"* {report['chosen']}: " in adapted.output


@pytest.mark.parametrize(
    ("run", "pick", "own", "kind"),
    [
        ("r2d2", "r2d2 head", ["r2d2 head"], "closed-form ridge head"),
        (
            "protonet",
            "protonet prototypes",
            ["protonet prototypes", "protonet head"],
            "nearest class prototype (mean features of the labels)",
        ),
    ],
)
def test_a_named_candidate_maps_and_its_saved_head_predicts_the_same_map(
    trained_runs: dict[str, Path],
    scene_files: SceneFiles,
    tmp_path: Path,
    run: str,
    pick: str,
    own: list[str],
    kind: str,
):
    """--pick by name: the R2-D2 run's ridge head, or ProtoNet's prototypes, makes the map; saved
    with the network, it is what `predict` maps with."""
    out, model = tmp_path / "head.tif", tmp_path / "adapted"
    result = invoke(
        *adapt_args(
            trained_runs[run],
            scene_files,
            out,
            "--compare",
            trained_runs["pretrain"],
            "--pick",
            pick,
            "--save-adapted",
            model,
        )
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("head.report.json").read_text())
    assert report["chosen"] == pick and report["pick"] == pick
    assert [c["name"] for c in report["candidates"]] == [*own, "pretrain fine-tuned", "pretrain head", "pixel"]
    assert report["candidates"][0]["kind"] == kind
    assert (model / "head.pt").exists()
    again = invoke(
        "predict", "--model", model, "--image", scene_files.image, "--out", tmp_path / "again.tif", "--device", "cpu"
    )
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(read_band(out), read_band(tmp_path / "again.tif"))


def test_the_pixel_classifier_alone_maps_without_a_run_and_without_a_check(scene_files: SceneFiles, tmp_path: Path):
    """Over a checked map of the same name: the earlier map's report goes with it, as it would
    describe a map that is no longer there."""
    out = tmp_path / "pixel.tif"
    checked = invoke(
        "adapt", "--model", "pixel", "--image", scene_files.image, "--labels", scene_files.labels, "--out", out
    )
    assert checked.exit_code == 0 and out.with_name("pixel.report.json").exists(), checked.output
    result = invoke(
        "adapt",
        "--model",
        "pixel",
        "--no-check",
        "--image",
        scene_files.image,
        "--labels",
        scene_files.labels,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "map made by pixel (not checked" in result.output
    assert not out.with_name("pixel.report.json").exists() and not out.with_name("pixel.report.md").exists()
    assert accuracy(out, scene_files.truth) > 0.5  # 5 classes: far above chance on a real classifier


def test_labels_too_clumped_to_check_still_give_the_map_and_the_report_says_why(
    trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    """Every label within a few pixels of the others: nothing can be held out."""
    with rasterio.open(scene_files.image) as src:
        xs, ys = zip(*(src.xy(60 + d, 60 + d) for d in range(4)))
        crs = src.crs
    labels = tmp_path / "clumped.gpkg"
    gpd.GeoDataFrame(
        {"class": ["Forest", "Forest", "Water", "Water"]}, geometry=gpd.points_from_xy(xs, ys), crs=crs
    ).to_file(labels, layer="labels")
    out = tmp_path / "clumped.tif"
    result = invoke(
        "adapt",
        "--model",
        trained_runs["maml"],
        "--image",
        scene_files.image,
        "--labels",
        labels,
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("clumped.report.json").read_text())
    assert report["chosen_estimate"] is None and report["chosen"] == "maml fine-tuned"
    assert report["notes"][0].startswith("no estimate: none of the 4 labels can be held out")
    assert "no estimate" in result.stderr and out.exists()


def _run_with_other_bands(run: Path, folder: Path) -> Path:
    other = folder / "other-bands"
    shutil.copytree(run, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "bands": list(reversed(config["bands"]))}))
    return other


@pytest.mark.parametrize(
    "case", ["compare run with other bands", "unknown candidate", "unknown pick", "save the pixel classifier"]
)
def test_bad_candidates_fail_clearly_and_write_nothing(
    case: str, trained_runs: dict[str, Path], scene_files: SceneFiles, tmp_path: Path
):
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    model: str | Path = trained_runs["maml"]
    more: list[str | Path] = []
    bad, words = None, ""
    if case == "compare run with other bands":
        bad = _run_with_other_bands(trained_runs["maml"], inputs)
        more, words = ["--compare", bad], "has other classes or bands than"
    elif case == "unknown candidate":
        bad = inputs / "nosuch"
        more, words = ["--compare", bad], "is not a run directory (no config.json and weights.pt), nor `pixel`"
    elif case == "unknown pick":
        bad, more, words = (
            scene_files.labels,
            ["--pick", "nosuch"],
            "--pick 'nosuch' is not best, first or a candidate: maml fine-tuned, maml head, pixel",
        )
    else:
        model, bad = "pixel", scene_files.labels
        more, words = ["--save-adapted", outputs / "model"], "--save-adapted needs a run"
    result = invoke(
        "adapt",
        "--model",
        model,
        "--image",
        scene_files.image,
        "--labels",
        scene_files.labels,
        "--out",
        outputs / "map.tif",
        "--device",
        "cpu",
        *more,
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {bad}: ") and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(outputs.iterdir()) == []
