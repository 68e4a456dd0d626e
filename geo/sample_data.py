"""Synthetic land-cover data in the real release layouts (SEN12MS, DeepGlobe, EuroSAT, a new scene).

The whole project trains and tests on this data, and meta-learning must be able to beat pooled
pretraining on it, so it carries what makes few-shot mapping a real problem:

Data model
----------
* **Places.** A SEN12MS scene, a DeepGlobe region, a EuroSAT UTM zone and the new scene are each
  a *place*. A place has a spatially coherent class map — the argmax of Gaussian-smoothed random
  fields, one per class, with biases tuned so that the 4-6 classes of the place cover balanced
  areas — cut into Voronoi *objects* (fields, stands, blocks).
* **Spectra.** Every DFC-10 class has a Sentinel-2 reflectance signature over the 13 bands
  (`S2_SIGNATURES`: forest dark in the visible with a strong red edge, water dark everywhere,
  snow bright in the visible and dark in the SWIR, ...) and a Sentinel-1 VV/VH backscatter in dB
  (`S1_SIGNATURES_DB`). A pixel is its class signature times a per-object gain
  (`OBJECT_VARIATION`, with a brightness per IGBP sub-type), a class-dependent texture and
  per-pixel noise (`PIXEL_NOISE`); S1 gets multiplicative speckle.
* **Place shift.** Each place moves every class signature, in log reflectance, by
  `REGION_SHIFT` times the median distance between class signatures, along a smooth spectral
  direction that partly points towards a class absent from the place. Inside a place classes stay
  separable; pooled over places, a class in one place looks like another class elsewhere. This
  is what a few labelled pixels from the place resolve and a pooled model cannot.
* **Acquisition.** Each image (a SEN12MS season, a EuroSAT zone, the scene) adds a per-band gain
  and a blue-weighted haze offset (`ATMOSPHERE_GAIN`, `HAZE`), and its season scales the red edge
  and NIR of vegetation (`SEASON_GREENNESS`) and the brightness of snow (`SNOW_BRIGHTNESS`).
  A SEN12MS scene id appears in two seasons: the same place and class map, other spectra.

Difficulty
----------
Every writer takes `difficulty`, a name in `DIFFICULTIES` (a `Difficulty` of the knobs above).
`default` is the model above with the module constants: classes are well apart and even a
per-pixel classifier on a few labels maps a place almost perfectly. `hard` is what a real region
looks like:

* **Low contrast.** Class signatures are pulled towards their common mean (log reflectance, S1
  dB, DeepGlobe log RGB) to 0.3 of their distance: grassland, savanna and cropland look alike.
* **Within-class variability.** Objects vary twice as much in brightness and more in colour, the
  class textures are twice as strong, and each pixel carries 22% noise per band (sensor noise
  plus the sub-pixel heterogeneity of a real cover). A single pixel is ambiguous; a 3 x 3 to
  7 x 7 neighbourhood, well inside objects tens of pixels wide, is not.
* **Mixed pixels.** The ground is seen through a Gaussian footprint (sigma 1.2 px) before the
  noise, so pixels along a boundary are mixtures of both covers.
* **Strong shift.** Places move their signatures by the full median class distance (S1 by 3 dB),
  the atmosphere varies more (gain spread 0.15, haze up to 0.05) and the season factors are
  squared, so pooled over places and seasons the classes overlap far more.

`hard` draws the same random numbers as `default`, so one seed gives the same class maps and
labelled points in both; `default` writes the same bytes as before difficulties existed.

Everything is drawn from `numpy.random.SeedSequence([seed, <kind>, <index>])` streams, so the
same seed writes byte-identical files and asking for more regions leaves the first ones as they
were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import Affine, xy
from scipy import ndimage
from shapely.geometry import Point

from geo.atomic import atomic_output
from geo.classes import DEEPGLOBE, DEEPGLOBE_UNKNOWN_COLOR, DFC10, EUROSAT_CLASSES, IGBP_TO_DFC10

ClassIds = Sequence[int] | np.ndarray
"""Class ids of a region: a list, or an int array as `deal_classes` deals them."""

SEASONS: tuple[str, ...] = (
    "ROIs1158_spring",
    "ROIs1868_summer",
    "ROIs1970_fall",
    "ROIs2017_winter",
)
"""SEN12MS season folders; the middle part is the release's ROI seed."""

WAVELENGTHS_NM = np.array([443, 490, 560, 665, 705, 740, 783, 842, 865, 945, 1375, 1610, 2190])
"""Central wavelength of S2_BANDS, for smooth spectral shifts."""

S2_SIGNATURES = np.array(
    [  # B1     B2     B3     B4     B5     B6     B7     B8     B8A    B9     B10    B11    B12
        [0.030, 0.028, 0.050, 0.030, 0.085, 0.220, 0.280, 0.300, 0.310, 0.105, 0.004, 0.150, 0.070],
        [0.060, 0.065, 0.095, 0.110, 0.150, 0.200, 0.225, 0.240, 0.250, 0.090, 0.005, 0.300, 0.220],
        [0.055, 0.055, 0.085, 0.085, 0.140, 0.230, 0.265, 0.280, 0.290, 0.100, 0.005, 0.270, 0.180],
        [0.045, 0.045, 0.085, 0.060, 0.135, 0.280, 0.340, 0.360, 0.370, 0.120, 0.005, 0.250, 0.140],
        [0.040, 0.040, 0.060, 0.045, 0.080, 0.150, 0.180, 0.190, 0.195, 0.060, 0.004, 0.100, 0.050],
        [0.050, 0.050, 0.095, 0.055, 0.150, 0.330, 0.410, 0.430, 0.440, 0.140, 0.005, 0.240, 0.120],
        [0.120, 0.120, 0.130, 0.140, 0.160, 0.180, 0.190, 0.200, 0.205, 0.075, 0.006, 0.210, 0.180],
        [0.800, 0.820, 0.800, 0.780, 0.760, 0.720, 0.700, 0.660, 0.640, 0.300, 0.020, 0.060, 0.040],
        [0.100, 0.110, 0.150, 0.200, 0.230, 0.250, 0.270, 0.280, 0.290, 0.100, 0.006, 0.360, 0.300],
        [0.070, 0.060, 0.050, 0.030, 0.020, 0.015, 0.012, 0.010, 0.009, 0.003, 0.002, 0.005, 0.003],
    ],
    dtype=np.float64,
)
"""Top-of-atmosphere reflectance of each DFC-10 class (rows in DFC10 order) in the 13 S2 bands."""

S1_SIGNATURES_DB = np.array(
    [
        [-7.0, -13.0],  # Forest
        [-9.0, -16.0],  # Shrubland
        [-9.5, -16.5],  # Savanna
        [-10.0, -17.0],  # Grassland
        [-6.0, -15.0],  # Wetlands (double bounce off flooded vegetation)
        [-9.0, -16.0],  # Croplands
        [0.0, -8.0],  # Urban/Built-up
        [-12.0, -20.0],  # Snow/Ice (dry)
        [-14.0, -22.0],  # Barren
        [-20.0, -26.0],  # Water
    ],
)
"""Mean VV, VH backscatter in dB of each DFC-10 class."""

TEXTURE = np.array([0.06, 0.05, 0.06, 0.03, 0.05, 0.04, 0.10, 0.02, 0.04, 0.01])
"""Amplitude of the spatially correlated brightness texture of each DFC-10 class."""

REGION_SHIFT = 0.5
"""Strength of the per-place shift of each class signature: this fraction of the median distance
between class signatures (in log reflectance). 0 makes every place look alike."""

OBJECT_VARIATION = 0.07
"""Log-normal spread of the brightness of one object (field, stand, block) of a class."""

OBJECT_BAND_VARIATION = 0.4
"""Per-band part of an object's spread, relative to its shared brightness: objects differ in
colour a little, not only in brightness."""

PIXEL_NOISE = 0.025
"""Relative per-pixel, per-band noise."""

ATMOSPHERE_GAIN = 0.06
"""Log-normal spread of the per-acquisition illumination gain (shared plus per band)."""

HAZE = 0.02
"""Largest path-radiance offset at 443 nm; it falls with wavelength to the fourth power."""

S1_SHIFT_DB = 1.5
"""Spread in dB of the per-place shift of each class's S1 backscatter (moisture, roughness)."""

SPECKLE_LOOKS = 4.4
"""Equivalent number of looks of the S1 GRD speckle (gamma distributed intensity)."""

SEASON_GREENNESS = dict(zip(SEASONS, (0.95, 1.1, 0.85, 0.7)))
"""Factor on the red-edge/NIR reflectance of vegetation in each season (red moves inversely)."""

SNOW_BRIGHTNESS = dict(zip(SEASONS, (0.85, 0.7, 0.8, 1.0)))
"""Factor on the visible/NIR reflectance of snow: fresh in winter, old and wet in summer."""

VEGETATION = np.array([0, 1, 2, 3, 4, 5])
"""DFC-10 classes whose red edge follows the season."""
SNOW_ICE = DFC10.class_id("Snow/Ice")
RED, RED_EDGE_NIR, VISIBLE_NIR = 3, np.array([5, 6, 7, 8]), np.arange(9)

IGBP_GAIN = np.ones(18)
"""Brightness of an IGBP sub-type inside its DFC-10 class (needleleaf forest darker, ...)."""
IGBP_GAIN[1:10] = (0.85, 0.95, 0.9, 1.08, 0.97, 0.95, 1.05, 0.95, 1.05)  # forests, shrubs, savannas
IGBP_GAIN[14] = 0.95  # cropland/natural vegetation mosaic

IGBP_TO_LCCS = np.zeros((18, 3), dtype=np.uint16)
"""Plausible LCCS land-cover, land-use, surface-hydrology codes of each IGBP code (lc bands 2-4)."""
IGBP_TO_LCCS[1:] = [
    (11, 10, 10),  # 1 evergreen needleleaf forest
    (12, 10, 10),  # 2 evergreen broadleaf forest
    (13, 10, 10),  # 3 deciduous needleleaf forest
    (14, 10, 10),  # 4 deciduous broadleaf forest
    (15, 10, 10),  # 5 mixed forest
    (41, 40, 40),  # 6 closed shrublands
    (43, 40, 40),  # 7 open shrublands
    (21, 20, 20),  # 8 woody savannas
    (22, 20, 20),  # 9 savannas
    (31, 30, 30),  # 10 grasslands
    (31, 30, 50),  # 11 permanent wetlands
    (31, 36, 30),  # 12 croplands
    (1, 9, 1),  # 13 urban and built-up
    (32, 35, 30),  # 14 cropland/natural vegetation mosaic
    (2, 2, 2),  # 15 snow and ice
    (1, 1, 1),  # 16 barren
    (3, 3, 3),  # 17 water bodies
]

DEEPGLOBE_LOOKS = np.array(
    [(128, 118, 112), (120, 135, 80), (150, 140, 100), (55, 80, 45), (35, 60, 85), (185, 170, 140)],
    dtype=np.float64,
)
"""Mean RGB (0-255) of each DeepGlobe class (DEEPGLOBE order) in the satellite images."""
DEEPGLOBE_TEXTURE = np.array([0.12, 0.06, 0.05, 0.08, 0.02, 0.04])
DEEPGLOBE_TINT = 0.4
"""Per-region colour cast (log gain per channel) of DeepGlobe images: what KMeans picks up."""

EUROSAT_LOOKS: dict[str, tuple[str, str | None, float, bool]] = {
    "AnnualCrop": ("Croplands", "Barren", 0.15, False),
    "Forest": ("Forest", None, 0.0, False),
    "HerbaceousVegetation": ("Savanna", "Grassland", 0.25, False),
    "Highway": ("Grassland", "Urban/Built-up", 0.15, True),
    "Industrial": ("Urban/Built-up", "Barren", 0.2, False),
    "Pasture": ("Grassland", None, 0.0, False),
    "PermanentCrop": ("Shrubland", "Croplands", 0.2, False),
    "Residential": ("Urban/Built-up", "Forest", 0.25, False),
    "River": ("Croplands", "Water", 0.2, True),
    "SeaLake": ("Water", None, 0.0, False),
}
"""EuroSAT class -> (main DFC-10 look, secondary look, its area share, whether it is a stripe)."""

BLOB_PATCHES = 1.5
"""Class blobs are about this many patches across: most patches get a clear majority class."""


@dataclass(frozen=True)
class Difficulty:
    """How hard the data is to map: the knobs between a well-separated toy and a real region.

    The defaults are the module constants (the `default` preset); contrast 1, texture 1, mixing 0
    and season strength 1 leave the signatures exactly as they are, so `default` writes the same
    bytes as before difficulties existed.
    """

    contrast: float = 1.0
    """Factor on each class signature's distance to the mean of all classes, in log reflectance
    (and in dB for S1, in log RGB for DeepGlobe): below 1, classes look alike, as grassland,
    savanna and cropland do in a real scene."""
    object_variation: float = OBJECT_VARIATION
    """Log-normal spread of one object's brightness: fields and stands of one class differ."""
    object_band_variation: float = OBJECT_BAND_VARIATION
    """Per-band part of that spread: objects of one class differ in colour as well."""
    texture: float = 1.0
    """Factor on the class texture amplitudes (`TEXTURE`, `DEEPGLOBE_TEXTURE`)."""
    pixel_noise: float = PIXEL_NOISE
    """Relative per-pixel, per-band noise (sensor noise plus sub-pixel heterogeneity): what makes a
    single pixel ambiguous and what a neighbourhood average removes."""
    mixing: float = 0.0
    """Sigma in pixels of the Gaussian footprint a pixel integrates the ground over: pixels along
    a boundary are mixtures of both covers, as a 10 m pixel over a field edge is."""
    region_shift: float = REGION_SHIFT
    """Per-place shift of the class signatures, as a fraction of their median distance (after
    `contrast`): what a few local labels resolve and a pooled model cannot."""
    s1_shift_db: float = S1_SHIFT_DB
    """Spread in dB of the per-place shift of the S1 backscatter."""
    atmosphere_gain: float = ATMOSPHERE_GAIN
    """Log-normal spread of the per-acquisition illumination gain (shared plus per band)."""
    haze: float = HAZE
    """Largest path-radiance offset at 443 nm."""
    season_strength: float = 1.0
    """Exponent on the season factors (`SEASON_GREENNESS`, `SNOW_BRIGHTNESS`): above 1 the seasons
    of one place differ more."""


DEFAULT_DIFFICULTY = Difficulty()

DIFFICULTIES: dict[str, Difficulty] = {
    "default": DEFAULT_DIFFICULTY,
    "hard": Difficulty(
        contrast=0.3,
        object_variation=0.15,
        object_band_variation=0.8,
        texture=2.0,
        pixel_noise=0.22,
        mixing=1.2,
        region_shift=1.0,
        s1_shift_db=3.0,
        atmosphere_gain=0.15,
        haze=0.05,
        season_strength=2.0,
    ),
}
"""Named presets: `default` (well separated, the tests' data) and `hard` (a realistic region)."""


def difficulty_preset(name: str) -> Difficulty:
    """The preset called `name`; a ValueError naming the choices otherwise."""
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


KINDS = ("sen12ms", "deepglobe", "eurosat", "scene")
_STREAM = {kind: number for number, kind in enumerate(KINDS)}
_GPKG_DATE = "2000-01-01T00:00:00.000Z"


# --- spectral model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """How a place moves the class signatures: log-reflectance shift per class, S1 shift in dB."""

    log_shift: np.ndarray
    s1_shift_db: np.ndarray


@dataclass(frozen=True)
class Acquisition:
    """One image of a place: season and the atmosphere's per-band gain and offset."""

    season: str
    gain: np.ndarray
    offset: np.ndarray


def _spectral_basis(wavelengths: np.ndarray) -> np.ndarray:
    """Smooth functions of log wavelength (Legendre degree 0-3): directions a real shift takes."""
    x = np.log(wavelengths)
    x = 2 * (x - x.min()) / (x.max() - x.min()) - 1
    return np.polynomial.legendre.legvander(x, 3)


def _typical_distance(log_signatures: np.ndarray) -> float:
    """Median pairwise Euclidean distance between class signatures."""
    diff = log_signatures[:, None, :] - log_signatures[None, :, :]
    upper = np.triu_indices(len(log_signatures), k=1)
    return float(np.median(np.linalg.norm(diff, axis=-1)[upper]))


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-12)


def contrast_pull(signatures: np.ndarray, contrast: float) -> np.ndarray:
    """What to add to (log) class signatures to scale their distance to the class mean by
    `contrast`; exactly 0 at contrast 1, so the default preset's arithmetic is unchanged."""
    return (contrast - 1) * (signatures - signatures.mean(axis=0))


def draw_shift(
    rng: np.random.Generator,
    log_signatures: np.ndarray,
    present: ClassIds,
    basis: np.ndarray,
    strength: float,
) -> np.ndarray:
    """Per-class log shift of one place: `strength` x typical distance, half of it aimed at an
    absent class (pooled over places, classes overlap), half along a random smooth direction."""
    size = strength * _typical_distance(log_signatures)
    absent = np.setdiff1d(np.arange(len(log_signatures)), present)
    shifts = np.zeros_like(log_signatures)
    for class_id in range(len(log_signatures)):
        direction = _unit(basis @ rng.standard_normal(basis.shape[1]))
        if len(absent):
            target = int(rng.choice(absent))
            direction = direction + _unit(log_signatures[target] - log_signatures[class_id])
        shifts[class_id] = size * _unit(direction)
    return shifts


def draw_place(rng: np.random.Generator, present: ClassIds, difficulty: Difficulty) -> Place:
    log_signatures = np.log(S2_SIGNATURES)
    log_signatures = log_signatures + contrast_pull(log_signatures, difficulty.contrast)
    log_shift = draw_shift(rng, log_signatures, present, _spectral_basis(WAVELENGTHS_NM), difficulty.region_shift)
    s1_shift_db = rng.normal(0.0, difficulty.s1_shift_db, S1_SIGNATURES_DB.shape)
    return Place(log_shift=log_shift, s1_shift_db=s1_shift_db)


def draw_acquisition(rng: np.random.Generator, season: str, difficulty: Difficulty) -> Acquisition:
    spread = difficulty.atmosphere_gain
    gain = np.exp(spread * (rng.standard_normal() + 0.5 * rng.standard_normal(13)))
    offset = difficulty.haze * rng.uniform(0.1, 1.0) * (WAVELENGTHS_NM[0] / WAVELENGTHS_NM) ** 4
    return Acquisition(season=season, gain=gain, offset=offset)


def season_signatures(season: str, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> np.ndarray:
    """S2_SIGNATURES, at the difficulty's class contrast, as a season shows them: vegetation
    greener in summer, snow fresh in winter."""
    signatures = S2_SIGNATURES * np.exp(contrast_pull(np.log(S2_SIGNATURES), difficulty.contrast))
    greenness = SEASON_GREENNESS[season] ** difficulty.season_strength
    signatures[np.ix_(VEGETATION, RED_EDGE_NIR)] *= greenness
    signatures[VEGETATION, RED] /= greenness
    signatures[SNOW_ICE, VISIBLE_NIR] *= SNOW_BRIGHTNESS[season] ** difficulty.season_strength
    return signatures


def place_signatures(place: Place, season: str, difficulty: Difficulty) -> np.ndarray:
    """The 10 x 13 class signatures of one place in one season."""
    return season_signatures(season, difficulty) * np.exp(place.log_shift)


# --- landscapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Landscape:
    """A place's class map cut into objects; objects carry a brightness and an IGBP sub-type."""

    class_map: np.ndarray
    objects: np.ndarray
    object_gain: np.ndarray
    object_igbp: np.ndarray
    texture: np.ndarray


def class_fields_map(
    rng: np.random.Generator,
    classes: ClassIds,
    shape: tuple[int, int],
    scale: float,
    fractions: np.ndarray | None = None,
    block: int | None = None,
) -> np.ndarray:
    """Argmax of smoothed random fields, one per class, biased until shares match `fractions`.

    Fields are smoothed on a coarse grid and upsampled (fast at any size); `scale` is the blob
    size in pixels. A little fine-scale noise keeps boundaries from looking drawn with a compass.
    The share balanced is of pixels, or, given `block`, of block x block patches by majority class
    (what a patch classification task counts).
    """
    classes = np.asarray(classes)
    count = len(classes)
    height, width = shape
    cell = max(1, round(scale / 4))
    coarse = (math.ceil(height / cell) + 1, math.ceil(width / cell) + 1)
    fields = ndimage.gaussian_filter(rng.standard_normal((count, *coarse), dtype=np.float32), sigma=(0, 1.5, 1.5))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    fields = ndimage.zoom(fields, (1, cell, cell), order=1, grid_mode=True, mode="nearest")
    fields = fields[:, :height, :width]
    fine = ndimage.gaussian_filter(rng.standard_normal((count, height, width), dtype=np.float32), sigma=(0, 1.5, 1.5))
    fields += 0.1 * fine / max(float(fine.std()), 1e-12)
    if fractions is None:
        fractions = rng.dirichlet(np.full(count, 40.0))
    # balancing on a subsample is as good and much faster; it must not split blocks
    step = max(1, cell // 2) if block is None else math.gcd(block, max(1, cell // 2))
    sub_block = None if block is None else block // step
    bias = _balance(fields[:, ::step, ::step], fractions, lambda labels: _shares(labels, count, sub_block))
    return classes[np.argmax(fields + bias[:, None, None], axis=0)].astype(np.uint8)


def _shares(labels: np.ndarray, count: int, block: int | None) -> np.ndarray:
    """Share of each label among pixels, or among block x block patches by majority."""
    if block is not None:
        rows, cols = labels.shape[0] // block, labels.shape[1] // block
        patches = labels[: rows * block, : cols * block].reshape(rows, block, cols, block).swapaxes(1, 2)
        patches = patches.reshape(rows * cols, block * block)
        labels = np.stack([(patches == label).sum(axis=1) for label in range(count)]).argmax(axis=0)
    return np.bincount(labels.ravel(), minlength=count) / labels.size


def _balance(
    fields: np.ndarray,
    fractions: np.ndarray,
    shares: Callable[[np.ndarray], np.ndarray],
    steps: int = 40,
) -> np.ndarray:
    """Per-field biases whose argmax shares come closest to `fractions`."""
    bias = np.zeros(len(fields), dtype=np.float32)
    best, best_error = bias.copy(), np.inf
    for _ in range(steps):
        got = shares(np.argmax(fields + bias[:, None, None], axis=0))
        error = float(np.abs(got - fractions).max())
        if error < best_error:
            best, best_error = bias.copy(), error
        bias += (0.5 * (fractions - got) / fractions).astype(np.float32)
    return best


def voronoi_objects(rng: np.random.Generator, shape: tuple[int, int], size: float) -> np.ndarray:
    """Parcel ids of a Voronoi partition with cells about `size` pixels across."""
    count = max(1, int(shape[0] * shape[1] / size**2))
    seeds = np.ones(shape, dtype=bool)
    rows, cols = rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)
    seeds[rows, cols] = False
    labels = np.zeros(shape, dtype=np.int32)
    labels[rows, cols] = np.arange(count, dtype=np.int32)
    nearest = ndimage.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    return labels[nearest[0], nearest[1]]


def texture_field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.0)
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def draw_landscape(rng: np.random.Generator, class_map: np.ndarray, scale: float, difficulty: Difficulty) -> Landscape:
    """Objects, their brightness (with an IGBP sub-type each) and texture for a class map."""
    parcels = voronoi_objects(rng, class_map.shape, max(scale / 2, 2.0))
    objects = parcels * DFC10.num_classes + class_map
    count = int(objects.max()) + 1
    object_class = np.arange(count) % DFC10.num_classes
    codes_of = [np.flatnonzero(IGBP_TO_DFC10[:18] == c) for c in range(DFC10.num_classes)]
    pick = rng.random(count)
    igbp = np.array(
        [codes_of[c][int(p * len(codes_of[c]))] for c, p in zip(object_class, pick)],
        dtype=np.uint16,
    )
    log_gain = difficulty.object_variation * (
        rng.standard_normal((count, 1)) + difficulty.object_band_variation * rng.standard_normal((count, 13))
    )
    gain = (np.exp(log_gain) * IGBP_GAIN[igbp][:, None]).astype(np.float32)
    return Landscape(class_map, objects, gain, igbp, texture_field(rng, class_map.shape))


def render_s2(
    rng: np.random.Generator,
    land: Landscape,
    signatures: np.ndarray,
    acquisition: Acquisition,
    difficulty: Difficulty,
    window: tuple[slice, slice] = (slice(None), slice(None)),
) -> np.ndarray:
    """uint16 (13, H, W) reflectance x 10000 of a window of a landscape (never 0: 0 is nodata)."""
    # mixing reads the ground around the window too, so patches cut from one landscape abut
    grown, inner = _grow(window, land.class_map.shape, math.ceil(4 * difficulty.mixing))
    classes = land.class_map[grown]
    reflectance = signatures.astype(np.float32)[classes] * land.object_gain[land.objects[grown]]
    texture = (difficulty.texture * TEXTURE).astype(np.float32)
    reflectance *= (1 + texture[classes] * land.texture[grown])[..., None]
    reflectance = mix_pixels(reflectance, difficulty.mixing)[inner]
    reflectance *= 1 + difficulty.pixel_noise * rng.standard_normal(reflectance.shape, dtype=np.float32)
    reflectance = reflectance * acquisition.gain.astype(np.float32) + acquisition.offset.astype(np.float32)
    return to_digital_numbers(reflectance.transpose(2, 0, 1))


def _grow(
    window: tuple[slice, slice], shape: tuple[int, int], margin: int
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """`window` grown by `margin` px on each side (clipped to `shape`), and where the window lies
    inside the grown one."""
    grown, inner = [], []
    for part, length in zip(window, shape):
        start, stop, _ = part.indices(length)
        low, high = max(start - margin, 0), min(stop + margin, length)
        grown.append(slice(low, high))
        inner.append(slice(start - low, stop - low))
    return (grown[0], grown[1]), (inner[0], inner[1])


def mix_pixels(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, bands) ground seen through a Gaussian footprint of `sigma` px: a pixel on a boundary
    is a mixture of the covers on both sides. Sigma 0 sees the ground as it is."""
    if sigma <= 0:
        return image
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="nearest")


def to_digital_numbers(reflectance: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(reflectance * 10000), 1, 10000).astype(np.uint16)


def render_s1(
    rng: np.random.Generator,
    land: Landscape,
    place: Place,
    season: str,
    difficulty: Difficulty,
    window: tuple[slice, slice],
) -> np.ndarray:
    """float32 (2, H, W) VV, VH in dB with per-object variation and gamma speckle."""
    contrasted_db = S1_SIGNATURES_DB + contrast_pull(S1_SIGNATURES_DB, difficulty.contrast)
    mean_db = contrasted_db + place.s1_shift_db
    if season in SEASONS[:2]:  # wet snow in spring and summer scatters little
        mean_db[SNOW_ICE] -= 5.0
    classes, objects = land.class_map[window], land.objects[window]
    object_db = 10 * np.log10(land.object_gain.mean(axis=1))  # the object's own brightness
    db = mean_db[classes] + object_db[objects][..., None]
    speckle = rng.gamma(SPECKLE_LOOKS, 1 / SPECKLE_LOOKS, db.shape)
    return (db + 10 * np.log10(speckle)).transpose(2, 0, 1).astype(np.float32)


def deal_classes(rng: np.random.Generator, count: int, universe: int, low: int, high: int) -> list[np.ndarray]:
    """`count` class subsets of size low..high dealt from shuffled decks, so every class occurs."""
    deck: list[int] = []
    subsets = []
    for _ in range(count):
        size = int(rng.integers(low, high + 1))
        chosen: list[int] = []
        while len(chosen) < size:
            if not deck:
                deck = list(rng.permutation(universe))
            candidate = deck.pop()
            if candidate not in chosen:
                chosen.append(candidate)
        subsets.append(np.sort(np.array(chosen)))
    return subsets


def _rng(seed: int, kind: str, *index: int) -> np.random.Generator:
    """An independent stream per (seed, kind, index...); the length prefix keeps keys apart
    (SeedSequence pads short keys with zeros, so [s, k] and [s, k, 0] would collide)."""
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM[kind], len(index), *index]))


# --- writers --------------------------------------------------------------------------------


def write_geotiff(path: Path, array: np.ndarray, crs: CRS, transform: Affine, **profile: object) -> Path:
    """Write a (bands, H, W) array as a GeoTIFF, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count, height, width = array.shape
    with (
        atomic_output(path) as tmp,
        rasterio.open(
            tmp,
            "w",
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype=array.dtype,
            crs=crs,
            transform=transform,
            **profile,
        ) as dst,
    ):
        dst.write(array)
    return path


def _write_image(path: Path, array: np.ndarray, image_format: str) -> None:
    """JPEG or PNG through Pillow: no georeferencing, like the DeepGlobe release."""
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))


def _origin_transform(left: float, top: float, x_size: float, y_size: float) -> Affine:
    """North-up grid with its upper-left corner at (left, top), like rasterio's from_origin."""
    return Affine(x_size, 0.0, left, 0.0, -y_size, top)


def utm_crs(zone: int, south: bool) -> CRS:
    return CRS.from_epsg((32700 if south else 32600) + zone)


def utm_origin(rng: np.random.Generator, south: bool, extent_m: float) -> tuple[float, float]:
    """Upper-left corner well inside a UTM zone (|lat| < ~54 deg, <= 150 km from the meridian)."""
    east = rng.uniform(350_000, 650_000 - extent_m)
    north = rng.uniform(4_000_000, 9_000_000) if south else rng.uniform(1_000_000, 6_000_000)
    return float(np.floor(east / 10) * 10), float(np.floor(north / 10) * 10)


def utm_zones(rng: np.random.Generator, count: int) -> list[tuple[int, bool]]:
    """Distinct (zone, south) pairs while there are enough of them."""
    order = rng.permutation(120)
    return [(int(order[i % 120] % 60) + 1, bool(order[i % 120] >= 60)) for i in range(count)]


def grid_shape(count: int) -> tuple[int, int]:
    rows = max(1, math.isqrt(count))
    return rows, math.ceil(count / rows)


def write_sen12ms(
    out: str | Path,
    *,
    seed: int = 0,
    regions: int = 6,
    size: int = 32,
    patches_per_region: int = 64,
    difficulty: str = "default",
) -> Path:
    """SEN12MS layout: `regions` scene ids, each seen in two seasons, `patches_per_region` patches
    of `size` px per (season, scene) cut on a grid from one per-scene map, s1 + s2 + lc files."""
    preset = difficulty_preset(difficulty)
    out = Path(out)
    rows, cols = grid_shape(patches_per_region)
    setup = _rng(seed, "sen12ms")
    scene_ids = setup.choice(np.arange(1, max(150, regions + 1)), size=regions, replace=False)
    zones = utm_zones(setup, regions)
    subsets = deal_classes(setup, regions, DFC10.num_classes, 4, 6)
    for number, (scene_id, (zone, south), classes) in enumerate(zip(scene_ids, zones, subsets)):
        rng = _rng(seed, "sen12ms", number)
        scale = BLOB_PATCHES * size
        equal = np.full(len(classes), 1 / len(classes))  # patch tasks want every class well stocked
        class_map = class_fields_map(rng, classes, (rows * size, cols * size), scale, equal, block=size)
        land = draw_landscape(rng, class_map, scale, preset)
        place = draw_place(rng, classes, preset)
        crs = utm_crs(zone, south)
        left, top = utm_origin(rng, south, cols * size * 10)
        lc = _lc_bands(land)
        for season in sorted(rng.choice(SEASONS, size=2, replace=False)):
            acquisition = draw_acquisition(rng, str(season), preset)
            signatures = place_signatures(place, str(season), preset)
            for patch in range(patches_per_region):
                row, col = divmod(patch, cols)
                window = (slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size))
                all_bands_in_window = (slice(None), *window)
                transform = _origin_transform(left + col * size * 10, top - row * size * 10, 10, 10)
                for kind, array in (
                    ("s2", render_s2(rng, land, signatures, acquisition, preset, window)),
                    ("s1", render_s1(rng, land, place, str(season), preset, window)),
                    ("lc", lc[all_bands_in_window]),
                ):
                    name = f"{season}_{kind}_{scene_id}_p{patch}.tif"
                    write_geotiff(out / str(season) / f"{kind}_{scene_id}" / name, array, crs, transform)
    return out


def _lc_bands(land: Landscape) -> np.ndarray:
    """uint16 (4, H, W): IGBP code of each pixel's object, then its LCCS codes."""
    igbp = land.object_igbp[land.objects]
    return np.concatenate([igbp[None], IGBP_TO_LCCS[igbp].transpose(2, 0, 1)]).astype(np.uint16)


def write_deepglobe(
    out: str | Path,
    *,
    seed: int = 0,
    regions: int = 4,
    size: int = 256,
    images_per_region: int = 4,
    difficulty: str = "default",
) -> Path:
    """DeepGlobe layout: `<id>_sat.jpg` + `<id>_mask.png` (jittered class colours, a little
    Unknown); each region has a colour cast and its own class looks, as clustered regions need."""
    preset = difficulty_preset(difficulty)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = _rng(seed, "deepglobe")
    ids = _image_ids(setup, regions * images_per_region)
    subsets = deal_classes(setup, regions, DEEPGLOBE.num_classes, 3, 5)
    phases = setup.uniform(0, 2 * np.pi)
    log_looks = np.log(DEEPGLOBE_LOOKS)
    log_looks = log_looks + contrast_pull(log_looks, preset.contrast)
    colours = np.array(DEEPGLOBE.colors, dtype=np.int16)
    for region, classes in enumerate(subsets):
        rng = _rng(seed, "deepglobe", region)
        angle = phases + 2 * np.pi * region / regions + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        tint = DEEPGLOBE_TINT * np.cos(angle) + rng.normal(0, 0.1)
        shift = draw_shift(rng, log_looks, classes, np.eye(3), preset.region_shift)
        looks = np.exp(log_looks + shift + tint)
        fractions = rng.dirichlet(np.full(len(classes), 40.0))
        for image_id in ids[region * images_per_region : (region + 1) * images_per_region]:
            class_map = class_fields_map(rng, classes, (size, size), scale=size / 4, fractions=fractions)
            land = draw_landscape(rng, class_map, size / 4, preset)
            texture = 1 + preset.texture * DEEPGLOBE_TEXTURE[class_map] * land.texture
            rgb = looks[class_map] * land.object_gain[land.objects][..., :3] * texture[..., None]
            rgb = mix_pixels(rgb, preset.mixing)
            rgb *= 1 + preset.pixel_noise * rng.standard_normal(rgb.shape)
            _write_image(out / f"{image_id}_sat.jpg", np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "JPEG")
            mask = colours[class_map]
            mask[unknown_blobs(rng, (size, size))] = DEEPGLOBE_UNKNOWN_COLOR
            _write_image(out / f"{image_id}_mask.png", jitter_colours(rng, mask), "PNG")
    return out


def _image_ids(setup: np.random.Generator, count: int) -> list[str]:
    """Six-digit image ids as in the release; image k belongs to region k // images_per_region."""
    return [str(i) for i in setup.choice(np.arange(100_000, 1_000_000), size=count, replace=False)]


def deepglobe_regions(*, seed: int = 0, regions: int = 4, images_per_region: int = 4) -> dict[str, int]:
    """Image id -> the region `write_deepglobe` drew it in: truth to check region discovery by."""
    ids = _image_ids(_rng(seed, "deepglobe"), regions * images_per_region)
    return {image_id: number // images_per_region for number, image_id in enumerate(ids)}


def unknown_blobs(rng: np.random.Generator, shape: tuple[int, int], share: float = 0.01) -> np.ndarray:
    """A few small blobs covering about `share` of the image: DeepGlobe's Unknown pixels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 64)
    return field > np.quantile(field, 1 - share)


def jitter_colours(rng: np.random.Generator, mask: np.ndarray, amount: int = 6) -> np.ndarray:
    """Move 0/255 channel values inwards by up to `amount`, as the release's impure mask colours."""
    jitter = rng.integers(0, amount + 1, mask.shape)
    return np.where(mask >= 128, mask - jitter, mask + jitter).astype(np.uint8)


def write_eurosat(
    out: str | Path,
    *,
    seed: int = 0,
    regions: int = 3,
    size: int = 64,
    patches_per_class: int = 8,
    difficulty: str = "default",
) -> Path:
    """EuroSAT layout `root/<ClassName>/<ClassName>_<n>.tif`: 13-band uint16 UTM patches, each
    mostly one class; a region is a UTM zone with its own place shift and atmosphere."""
    preset = difficulty_preset(difficulty)
    out = Path(out)
    setup = _rng(seed, "eurosat")
    zones = utm_zones(setup, regions)
    seasons = setup.choice(SEASONS, size=regions)
    places, acquisitions = [], []
    for region, season in enumerate(seasons):
        rng = _rng(seed, "eurosat", region)
        places.append(draw_place(rng, range(DFC10.num_classes), preset))
        acquisitions.append(draw_acquisition(rng, str(season), preset))
    for number, name in enumerate(EUROSAT_CLASSES):
        main, other, share, stripe = EUROSAT_LOOKS[name]
        for patch in range(patches_per_class):
            region = (patch + number) % regions
            rng = _rng(seed, "eurosat", number, patch)
            class_map = np.full((size, size), DFC10.class_id(main), dtype=np.uint8)
            if other is not None:
                where = _stripe(rng, size, share) if stripe else _blob(rng, size, share)
                class_map[where] = DFC10.class_id(other)
            land = draw_landscape(rng, class_map, size / 2, preset)
            signatures = place_signatures(places[region], str(seasons[region]), preset)
            zone, south = zones[region]
            left, top = utm_origin(rng, south, size * 10)
            write_geotiff(
                out / name / f"{name}_{patch + 1}.tif",
                render_s2(rng, land, signatures, acquisitions[region], preset),
                utm_crs(zone, south),
                _origin_transform(left, top, 10, 10),
            )
    return out


def _blob(rng: np.random.Generator, size: int, share: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=size / 6)
    return field > np.quantile(field, 1 - share)


def _stripe(rng: np.random.Generator, size: int, share: float) -> np.ndarray:
    """A straight band (road, river) through the patch covering about `share` of it."""
    angle = rng.uniform(0, np.pi)
    rows, cols = np.mgrid[:size, :size] - (size - 1) / 2
    distance = np.abs(rows * np.cos(angle) - cols * np.sin(angle))
    return distance < share * size / 2


@dataclass(frozen=True)
class SceneFiles:
    """A new region: the image to map, a few labelled points and the full truth to score against."""

    image: Path
    labels: Path
    truth: Path


def write_scene(
    out: str | Path,
    *,
    seed: int = 0,
    size: int = 512,
    points_per_class: int = 5,
    difficulty: str = "default",
) -> SceneFiles:
    """A `size` x `size` 13-band uint16 UTM scene of an unseen place (nodata=0 along a swath edge),
    `points_per_class` labelled points per class in EPSG:4326 (`class` column, DFC-10 names) and a
    uint8 truth raster (255 on nodata) on the scene grid."""
    preset = difficulty_preset(difficulty)
    out = Path(out)
    rng = _rng(seed, "scene")
    classes = deal_classes(rng, 1, DFC10.num_classes, 4, 6)[0]
    class_map = class_fields_map(rng, classes, (size, size), scale=BLOB_PATCHES * 32)
    land = draw_landscape(rng, class_map, BLOB_PATCHES * 32, preset)
    place = draw_place(rng, classes, preset)
    season = str(rng.choice(SEASONS))
    signatures = place_signatures(place, season, preset)
    image = render_s2(rng, land, signatures, draw_acquisition(rng, season, preset), preset)
    rows, cols = np.mgrid[:size, :size]
    nodata = cols < size * (0.02 + 0.08 * rows / size)  # the slanted edge of a satellite swath
    image[:, nodata] = 0
    truth = np.where(nodata, 255, class_map).astype(np.uint8)
    ((zone, south),) = utm_zones(rng, 1)
    crs = utm_crs(zone, south)
    transform = _origin_transform(*utm_origin(rng, south, size * 10), 10, 10)
    blocks = {"tiled": True, "blockxsize": 256, "blockysize": 256} if size >= 256 else {}
    files = SceneFiles(out / "scene.tif", out / "labels.gpkg", out / "truth.tif")
    write_geotiff(files.image, image, crs, transform, nodata=0, compress="deflate", **blocks)
    write_geotiff(files.truth, truth[None], crs, transform, nodata=255, compress="deflate", **blocks)
    points = labelled_points(rng, truth, classes, points_per_class)
    xs, ys = xy(transform, points[:, 0], points[:, 1])
    frame = gpd.GeoDataFrame(
        {"class": [DFC10.names[c] for c in truth[points[:, 0], points[:, 1]]]},
        geometry=[Point(x, y) for x, y in zip(xs, ys)],
        crs=crs,
    ).to_crs("EPSG:4326")
    with atomic_output(files.labels) as tmp, _fixed_gpkg_date():
        frame.to_file(tmp, driver="GPKG", layer="labels")
    return files


def labelled_points(rng: np.random.Generator, truth: np.ndarray, classes: ClassIds, count: int) -> np.ndarray:
    """(row, col) of `count` pixels per class, away from class edges, as a careful labeller."""
    chosen = []
    for class_id in classes:
        inner = ndimage.binary_erosion(truth == class_id, iterations=3)
        candidates = np.argwhere(inner if inner.any() else truth == class_id)
        if not len(candidates):
            continue
        chosen.append(candidates[rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)])
    return np.concatenate(chosen)


@contextlib.contextmanager
def _fixed_gpkg_date() -> Iterator[None]:
    """GeoPackages record their write time; pin it so the same seed gives the same bytes."""
    previous = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": _GPKG_DATE})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": previous})


def generate(
    kind: str,
    out: str | Path,
    *,
    seed: int = 0,
    regions: int | None = None,
    size: int | None = None,
    difficulty: str = "default",
) -> Path:
    """Write sample data of `kind` under `out`; `regions`/`size` override the kind's defaults,
    `difficulty` names a preset of `DIFFICULTIES`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    options = {key: value for key, value in (("regions", regions), ("size", size)) if value is not None}
    if kind == "scene":
        if regions is not None:
            raise ValueError("a scene is one region: --regions does not apply")
        return write_scene(out, seed=seed, difficulty=difficulty, **options).image.parent
    writers: dict[str, Callable[..., Path]] = {
        "sen12ms": write_sen12ms,
        "deepglobe": write_deepglobe,
        "eurosat": write_eurosat,
    }
    return writers[kind](out, seed=seed, difficulty=difficulty, **options)
