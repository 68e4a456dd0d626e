"""The names of the training methods, without importing torch: `landcover train --method` lists
them and the CLI stays quick to import. `models.learners.LEARNERS` holds the same names (a test
checks), so a new learner is its module, one line there and its name here."""

LEARNER_NAMES: tuple[str, ...] = (
    "protonet",
    "reptile",
    "anil",
    "metasgd",
    "mamlpp",
    "maml-ga",
    "maml",
    "fomaml",
    "r2d2",
    "pretrain",
)
