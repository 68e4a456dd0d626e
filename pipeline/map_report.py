"""The report beside an adapted map (`MAP.report.json`, `MAP.report.md`): how good each candidate
is estimated to be on the user's own labels, which one made the map, and why an estimate is
missing when it is. The JSON is for scripts and the flows; the Markdown for a person.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geo.atomic import atomic_output
from pipeline.crossval import CrossValidation, Estimate


@dataclass(frozen=True)
class MapReportInput:
    scene: Path
    labels: Path
    class_names: tuple[str, ...]
    classes: np.ndarray
    """Global class ids of the labels, in the order of `targets`' 0..N-1."""
    targets: np.ndarray
    validation: CrossValidation
    chosen: str
    pick: str
    descriptions: dict[str, dict]


@dataclass(frozen=True)
class MapReport:
    json: Path
    markdown: Path
    content: dict

    @property
    def chosen_estimate(self) -> dict | None:
        return self.content["chosen_estimate"]


def report_paths(out: Path) -> dict[str, Path]:
    """Where the reports of the map `out` go: beside it, named after it."""
    out = Path(out)
    return {"JSON": out.with_name(f"{out.stem}.report.json"), "Markdown": out.with_name(f"{out.stem}.report.md")}


def write_map_report(out: Path, given: MapReportInput) -> MapReport:
    """Write both reports atomically; returns their paths and the JSON content."""
    content = _content(given)
    paths = report_paths(out)
    for path, text in ((paths["JSON"], json.dumps(content, indent=2)), (paths["Markdown"], _markdown(content))):
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text + "\n")
    return MapReport(json=paths["JSON"], markdown=paths["Markdown"], content=content)


def _content(given: MapReportInput) -> dict:
    names = [given.class_names[c] for c in given.classes]
    validation = given.validation
    counts = np.bincount(given.targets, minlength=len(names))
    notes = [f"{given.class_names[class_id]}: {reason}" for class_id, reason in sorted(validation.unscored.items())]
    folds = int(validation.folds.max()) + 1 if len(validation.folds) else 0
    if not any(estimate.scored for estimate in validation.estimates):
        notes.insert(
            0,
            (
                f"no estimate: none of the {len(given.targets)} labels can be held out with labels of its "
                f"class more than {validation.spacing:g} px away left to train on; label more places"
            ),
        )
    estimates = {e.name: _estimate(e, names, given.class_names) for e in validation.estimates}
    return {
        "scene": str(given.scene),
        "labels": str(given.labels),
        "labels_per_class": dict(zip(names, counts.tolist())),
        "check": {
            "method": "spatially blocked cross-validation",
            "folds": folds,
            "spacing_px": validation.spacing,
            "labels_per_fold": np.bincount(validation.folds).tolist() if len(validation.folds) else [],
        },
        "candidates": [
            {"name": name, **given.descriptions.get(name, {}), "estimate": estimate}
            for name, estimate in estimates.items()
        ],
        "chosen": given.chosen,
        "pick": given.pick,
        "chosen_estimate": estimates.get(given.chosen),
        "notes": notes,
    }


def _estimate(estimate: Estimate, names: list[str], class_names: tuple[str, ...]) -> dict | None:
    if not estimate.scored:
        return None
    return {
        "accuracy": estimate.accuracy,
        "ci95": [estimate.low, estimate.high],
        "held_out_labels": estimate.scored,
        "recall": {class_names[c]: r for c, r in estimate.recall.items()},
        "confusion": {"classes": names, "rows_true_columns_predicted": estimate.confusion},
    }


def _markdown(content: dict) -> str:
    lines = [
        f"# Map report: {Path(content['scene']).name}",
        "",
        f"Labels: {content['labels']} — "
        + ", ".join(f"{name} {count}" for name, count in content["labels_per_class"].items()),
        "",
        f"Check: {content['check']['method']}, {content['check']['folds']} folds of "
        f"{content['check']['spacing_px']:g} px blocks; labels within {content['check']['spacing_px']:g} px of a "
        "held-out label are left out of training.",
        "",
        "| candidate | how | estimated accuracy | 95% interval | held-out labels |",
        "|---|---|---|---|---|",
    ]
    for candidate in content["candidates"]:
        how = ", ".join(f"{key} {value}" for key, value in candidate.items() if key not in ("name", "estimate"))
        estimate = candidate["estimate"]
        if estimate is None:
            lines.append(f"| {candidate['name']} | {how} | — | — | 0 |")
        else:
            low, high = estimate["ci95"]
            lines.append(
                f"| {candidate['name']} | {how} | {estimate['accuracy']:.3f} | {low:.3f}–{high:.3f} | "
                f"{estimate['held_out_labels']} |"
            )
    lines += ["", f"The map was made by **{content['chosen']}** (pick: {content['pick']})."]
    chosen = content["chosen_estimate"]
    if chosen is not None:
        lines += [
            "",
            "Per-class recall of the chosen candidate: "
            + ", ".join(f"{name} {value:.2f}" for name, value in chosen["recall"].items()),
        ]
        classes = chosen["confusion"]["classes"]
        lines += [
            "",
            "Confusion (rows: true, columns: predicted):",
            "",
            "| | " + " | ".join(classes) + " |",
            "|---" * (len(classes) + 1) + "|",
        ]
        for name, row in zip(classes, chosen["confusion"]["rows_true_columns_predicted"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if content["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in content["notes"]]
    return "\n".join(lines)
