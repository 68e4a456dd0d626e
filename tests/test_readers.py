"""Readers: every layout with its dtypes and label decoding, and each bad input as a DataError."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from geo import readers
from geo.classes import DEEPGLOBE, DFC10, EUROSAT_CLASSES, IGNORE_INDEX
from geo.errors import DataError
from geo.index import read_index
from geo.sample_data import write_geotiff, write_sen12ms
from geo.sources import SOURCE_NAMES, get_source, index_source
from geo.sources.base import SourceFile
from geo.sources.deepglobe import DeepGlobe
from geo.sources.folder import ClassFolders
from geo.sources.sen12ms import Sen12ms

# DeepGlobe JPEGs have no georeferencing by design
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

UTM = {"crs": "EPSG:32631", "transform": Affine(10, 0, 500000, 0, -10, 5000000)}

# DESIGN.md: IGBP 1-5 Forest, 6-7 Shrubland, 8-9 Savanna, 10 Grassland, 11 Wetlands,
# 12 and 14 Croplands, 13 Urban, 15 Snow/Ice, 16 Barren, 17 Water
IGBP_EXPECTED = {
    1: "Forest",
    2: "Forest",
    3: "Forest",
    4: "Forest",
    5: "Forest",
    6: "Shrubland",
    7: "Shrubland",
    8: "Savanna",
    9: "Savanna",
    10: "Grassland",
    11: "Wetlands",
    12: "Croplands",
    13: "Urban/Built-up",
    14: "Croplands",
    15: "Snow/Ice",
    16: "Barren",
    17: "Water",
}


def _write(path: Path, array: np.ndarray, **profile) -> Path:
    """A GeoTIFF in the test's UTM grid, written by the generator's own writer."""
    settings = {**UTM, **profile}
    return write_geotiff(path, array, settings.pop("crs"), settings.pop("transform"), **settings)


def _sen12ms_pair(folder: Path, lc_band1: np.ndarray, bands: int = 13) -> tuple[Path, Path]:
    height, width = lc_band1.shape
    s2 = _write(
        folder / "ROIs1158_spring/s2_1/ROIs1158_spring_s2_1_p0.tif",
        np.full((bands, height, width), 1234, dtype=np.uint16),
    )
    lc = np.zeros((4, height, width), dtype=np.uint16)
    lc[0] = lc_band1
    return s2, _write(folder / "ROIs1158_spring/lc_1/ROIs1158_spring_lc_1_p0.tif", lc)


def test_scale_image() -> None:
    assert readers.scale_image(np.array([0, 255], dtype=np.uint8)).tolist() == [0.0, 1.0]
    scaled = readers.scale_image(np.array([0, 5000, 10000, 23000], dtype=np.uint16))
    assert scaled.dtype == np.float32 and scaled.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert readers.scale_image(np.array([-5, 100], dtype=np.int16)).tolist() == pytest.approx([0.0, 0.01])


def test_full_igbp_to_dfc10_mapping(tmp_path: Path) -> None:
    codes = np.arange(0, 20, dtype=np.uint16).reshape(4, 5)  # 0, 1-17, 18, 19
    codes[-1, -1] = 300
    s2, lc = _sen12ms_pair(tmp_path, codes)
    mask = Sen12ms().read(SourceFile(s2, lc)).mask
    assert mask.dtype == np.uint8
    for code, class_id in zip(codes.ravel(), mask.ravel()):
        expected = DFC10.class_id(IGBP_EXPECTED[int(code)]) if int(code) in IGBP_EXPECTED else IGNORE_INDEX
        assert class_id == expected, code


def test_sen12ms_patch_with_s1(sen12ms_root: Path) -> None:
    dataset = Sen12ms().discover(sen12ms_root)
    first = dataset.files[0]
    assert first.season is not None and first.scene is not None and first.s1_path is not None
    assert first.season.startswith("ROIs") and first.scene.isdigit() and first.s1_path.exists()
    tile = Sen12ms().read(first, with_s1=True)
    assert tile.image.dtype == np.float32 and tile.image.shape == (13, 32, 32)
    assert tile.image.min() > 0 and tile.image.max() <= 1
    assert tile.mask.dtype == np.uint8 and set(np.unique(tile.mask)) <= set(range(10))
    assert tile.s1 is not None
    assert tile.s1.dtype == np.float32 and tile.s1.shape == (2, 32, 32)
    assert -45 < np.median(tile.s1) < 5  # dB
    window = Sen12ms().read(SourceFile(first.path, first.label_path), Window(8, 4, 16, 8))
    assert np.array_equal(window.image, tile.image[:, 4:12, 8:24]) and window.s1 is None


def _mask_png(path: Path, colours: np.ndarray) -> Path:
    Image.fromarray(colours.astype(np.uint8)).save(path)
    return path


def test_deepglobe_colours_with_jitter(tmp_path: Path) -> None:
    palette = [*DEEPGLOBE.colors, (0, 0, 0)]
    base = np.array(palette, dtype=np.int16)[np.arange(28) % 7].reshape(4, 7, 3)
    jitter = np.random.default_rng(0).integers(0, 9, base.shape)
    colours = np.where(base == 255, base - jitter, base + jitter)
    mask = _mask_png(tmp_path / "1_mask.png", colours)
    Image.fromarray(np.full((4, 7, 3), 90, dtype=np.uint8)).save(tmp_path / "1_sat.jpg")
    tile = DeepGlobe().read(SourceFile(tmp_path / "1_sat.jpg", mask))
    expected = np.array([*range(6), IGNORE_INDEX])[np.arange(28) % 7].reshape(4, 7)
    assert np.array_equal(tile.mask, expected)
    assert tile.image.shape == (3, 4, 7) and tile.image.dtype == np.float32
    assert tile.image.max() == pytest.approx(90 / 255, abs=0.03)


def test_deepglobe_grid_tiles(deepglobe_root: Path) -> None:
    dataset = DeepGlobe().discover(deepglobe_root)
    tiles = list(readers.read_tiles(DeepGlobe(), dataset.files[0], grid=4))
    assert len(tiles) == 16 and tiles[5].window == Window(32, 32, 32, 32)
    assert tiles[0].crs is None and tiles[0].bounds is None
    whole = DeepGlobe().read(dataset.files[0])
    assert np.array_equal(tiles[5].tile.mask, whole.mask[32:64, 32:64])
    assert set(np.unique(whole.mask)) <= {*range(6), IGNORE_INDEX}


@pytest.mark.parametrize(
    ("colour", "problem"),
    [
        ((250, 3, 2), "no DeepGlobe class"),
        ((120, 130, 100), "far from every DeepGlobe class colour"),
    ],
)
def test_deepglobe_mask_with_foreign_colours(tmp_path: Path, colour: tuple, problem: str) -> None:
    colours = np.zeros((20, 20, 3), dtype=np.uint8)
    colours[:, :] = DEEPGLOBE.colors[3]
    colours[5:10, 5:10] = colour  # 6% of the pixels
    mask = _mask_png(tmp_path / "2_mask.png", colours)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "2_sat.jpg")
    with pytest.raises(DataError, match=problem) as error:
        DeepGlobe().read(SourceFile(tmp_path / "2_sat.jpg", mask))
    assert error.value.path == str(mask)


def test_folder_patches_take_their_class_from_the_folder(eurosat_root: Path) -> None:
    dataset = ClassFolders().discover(eurosat_root)
    assert dataset.scheme.names == tuple(sorted(EUROSAT_CLASSES)) and not dataset.problems
    river = next(f for f in dataset.files if f.path.parent.name == "River")
    tile = ClassFolders().read(river)
    assert tile.image.shape == (13, 64, 64)
    assert np.all(tile.mask == dataset.scheme.class_id("River"))


def test_load_tile_reads_each_source_through_its_window(
    sen12ms_index: Path, deepglobe_index: Path, eurosat_index: Path
) -> None:
    for index in (sen12ms_index, deepglobe_index, eurosat_index):
        frame, metadata = read_index(index)
        row = frame.iloc[-1]
        tile = readers.load_tile(row, index_source(metadata))
        assert tile.image.shape == (len(metadata["bands"]), row["height"], row["width"])
        assert tile.mask.shape == (row["height"], row["width"])
        counts = np.bincount(tile.mask[tile.mask != IGNORE_INDEX], minlength=len(row["class_counts"]))
        assert counts.tolist() == list(row["class_counts"])


# --- bad inputs: each raises DataError naming the file ------------------------------------------


@pytest.fixture
def small_sen12ms(tmp_path: Path) -> list[SourceFile]:
    root = write_sen12ms(tmp_path / "s", seed=1, regions=1, size=16, patches_per_region=2)
    return Sen12ms().discover(root).files


def _read_all(file: SourceFile) -> None:
    list(readers.read_tiles(Sen12ms(), file))


def test_truncated_geotiff(small_sen12ms: list[SourceFile]) -> None:
    path = small_sen12ms[0].path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as error:
        _read_all(small_sen12ms[0])
    assert error.value.path == str(path)


def test_corrupt_file(small_sen12ms: list[SourceFile]) -> None:
    small_sen12ms[0].path.write_bytes(b"II*\x00 this is not a GeoTIFF")
    with pytest.raises(DataError, match="cannot be opened") as error:
        _read_all(small_sen12ms[0])
    assert error.value.path == str(small_sen12ms[0].path)


def test_s2_with_wrong_band_count(tmp_path: Path) -> None:
    s2, lc = _sen12ms_pair(tmp_path, np.ones((4, 4), dtype=np.uint16), bands=12)
    with pytest.raises(DataError, match="has 12 bands") as error:
        Sen12ms().read(SourceFile(s2, lc))
    assert error.value.path == str(s2)


def test_s2_without_its_lc_pair(small_sen12ms: list[SourceFile]) -> None:
    label_path = small_sen12ms[1].label_path
    assert label_path is not None
    label_path.unlink()
    with pytest.raises(DataError, match="no label file") as error:
        _read_all(small_sen12ms[1])
    assert error.value.path == str(small_sen12ms[1].path)


def test_lc_on_another_grid(tmp_path: Path) -> None:
    s2, lc = _sen12ms_pair(tmp_path, np.ones((4, 4), dtype=np.uint16))
    _write(lc, np.ones((4, 5, 5), dtype=np.uint16))
    with pytest.raises(DataError, match="5x5 px") as error:
        Sen12ms().read(SourceFile(s2, lc))
    assert error.value.path == str(lc)


def test_image_without_crs(tmp_path: Path) -> None:
    path = tmp_path / "Forest" / "Forest_1.tif"
    path.parent.mkdir()
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=13, dtype="uint16") as dst:
        dst.write(np.ones((13, 4, 4), dtype=np.uint16))
    with pytest.raises(DataError, match="no CRS") as error:
        ClassFolders().read(SourceFile(path, class_id=0))
    assert error.value.path == str(path)


def test_empty_and_missing_layouts(tmp_path: Path, deepglobe_root: Path) -> None:
    (tmp_path / "empty").mkdir()
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes: [{value: 1, name: a, color: '#ff0000'}, {value: 2, name: b, color: '#00ff00'}]\n")
    for source in SOURCE_NAMES:
        with pytest.raises(DataError) as error:
            get_source(source, classes=classes if source == "pairs" else None).discover(tmp_path / "empty")
        assert error.value.path == str(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        Sen12ms().discover(tmp_path / "absent")
    folders = tmp_path / "folders"
    (folders / "Water").mkdir(parents=True)
    (folders / "Forest").mkdir()
    _write(folders / "Forest" / "Forest_1.tif", np.ones((13, 4, 4), dtype=np.uint16))
    dataset = ClassFolders().discover(folders)
    assert dataset.scheme.names == ("Forest",)
    assert [problem.path for problem in dataset.problems] == [str(folders / "Water")]


def test_deepglobe_image_without_its_mask(tmp_path: Path, deepglobe_root: Path) -> None:
    sat = next(deepglobe_root.glob("*_sat.jpg"))
    shutil.copy(sat, tmp_path / sat.name)
    (file,) = DeepGlobe().discover(tmp_path).files
    with pytest.raises(DataError, match="no label file") as error:
        list(readers.read_tiles(DeepGlobe(), file, grid=4))
    assert error.value.path == str(tmp_path / sat.name)
