"""Meta-train / meta-validation / meta-test splits by region, so no place leaks across splits.

A region is never split. For SEN12MS the scene id is kept whole too: the same place seen in
spring and in winter (two regions) must not sit in training and in test at once. The unit that
goes to one split is therefore a *group*: the connected set of regions that share a scene id
(for metadata regions of SEN12MS, exactly one scene id and its seasons; for any other source,
one region).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def split_groups(frame: pd.DataFrame, regions: pd.Series, together: str | None = None) -> pd.Series:
    """Per row, the group that must stay in one split: regions joined through a shared value of
    the column `together` (the source's `split_together`: a SEN12MS scene id; connected components
    of the region-scene graph), else the region itself.

    Group names are the sorted member regions joined by ' + ' (so a SEN12MS metadata group reads
    `ROIs1158_spring/76 + ROIs2017_winter/76`).
    """
    regions = pd.Series(np.asarray(regions, dtype=object), index=frame.index).astype(str)
    parent = {name: name for name in regions.unique()}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    if together is not None and together in frame.columns:
        scenes = frame[together].astype(str)
        for members in regions.groupby(scenes.to_numpy(), sort=True).unique():
            first, *rest = sorted(members)
            for other in rest:
                a, b = root(first), root(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    components: dict[str, list[str]] = {}
    for name in sorted(parent):
        components.setdefault(root(name), []).append(name)
    label = {name: " + ".join(members) for members in components.values() for name in members}
    return regions.map(label).rename("group")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.6,0.2,0.2' -> fractions of train, val, test that sum to one."""
    try:
        values = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"split {text!r} is not three comma-separated numbers (e.g. 0.6,0.2,0.2)") from None
    valid = len(values) == 3 and all(np.isfinite(values)) and min(values) >= 0
    if not valid or not np.isclose(sum(values), 1.0):
        raise ValueError(
            f"split {text!r} must be three non-negative fractions for train,val,test summing to 1 (e.g. 0.6,0.2,0.2)"
        )
    return values[0], values[1], values[2]


def split_by_fractions(groups: pd.Series, fractions: Sequence[float] = (0.6, 0.2, 0.2), *, seed: int = 0) -> pd.Series:
    """Assign whole groups to splits at random (seeded), as close to the fractions as whole
    groups allow; every split with a non-zero fraction gets at least one group."""
    fractions = tuple(float(value) for value in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    names = np.array(sorted(groups.astype(str).unique()), dtype=object)
    order = np.random.default_rng(seed).permutation(len(names))
    counts = group_counts(len(names), fractions)
    assignment: dict[str, str] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        for index in order[start : start + count]:
            assignment[names[index]] = split
        start += count
    return groups.astype(str).map(assignment).rename("split")


def group_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Whole-group counts per split: one for each non-zero fraction, the rest by largest remainder."""
    wanted = np.array([fraction > 0 for fraction in fractions])
    if total < wanted.sum():
        raise ValueError(
            f"{total} region group{'s' if total != 1 else ''} cannot fill {int(wanted.sum())} "
            "non-empty splits: give more regions, or a zero fraction to a split"
        )
    counts = wanted.astype(int)
    remaining = total - int(counts.sum())
    need = np.clip(np.asarray(fractions, dtype=float) * total - counts, 0, None)
    weights = need if need.sum() > 0 else np.asarray(fractions, dtype=float)
    quota = weights / weights.sum() * remaining
    extra = np.floor(quota + 1e-9).astype(int)
    counts += extra
    for index in np.argsort(-(quota - extra), kind="stable")[: total - int(counts.sum())]:
        counts[int(index)] += 1
    return [int(count) for count in counts]


def split_explicit(
    regions: pd.Series, lists: Mapping[str, Sequence[str]], groups: pd.Series | None = None
) -> pd.Series:
    """Splits from explicit lists of regions: every region listed exactly once, no unknown
    names, and (with `groups`) the regions of one group in one split."""
    regions = regions.astype(str)
    known = set(regions)
    assignment: dict[str, str] = {}
    for split, members in lists.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in the split lists; splits are {', '.join(SPLITS)}")
        if isinstance(members, str) or not isinstance(members, Sequence):
            raise ValueError(f"split {split!r} must hold a list of region names")
        for member in map(str, members):
            if member in assignment:
                raise ValueError(f"region {member!r} is listed in both {assignment[member]} and {split}")
            assignment[member] = split
    unknown = sorted(set(assignment) - known)
    if unknown:
        raise ValueError(f"the split lists name regions not in the index: {_some(unknown)}")
    missing = sorted(known - set(assignment))
    if missing:
        raise ValueError(f"regions not assigned to any split: {_some(missing)}")
    splits = regions.map(assignment).rename("split")
    if groups is not None:
        table = pd.DataFrame(
            {"group": groups.astype(str).to_numpy(), "region": regions.to_numpy(), "split": splits.to_numpy()}
        )
        for _, rows in table.groupby("group", sort=True):
            if rows["split"].nunique() > 1:
                where = rows.drop_duplicates("region").sort_values("region")
                listed = ", ".join(f"{r} in {s}" for r, s in zip(where["region"], where["split"]))
                raise ValueError(f"regions that share a SEN12MS scene id must share a split: {listed}")
    return splits


def _some(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
