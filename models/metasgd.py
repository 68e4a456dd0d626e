"""Meta-SGD (Li et al. 2017): MAML with a learned inner rate for every parameter element, not one
per tensor, so the inner loop learns a direction as well as a step size.

At test time the network is fine-tuned with those per-element rates (or a picked scalar rate,
whichever validates better), for the budget picked on validation regions.
"""

from __future__ import annotations

from models.maml import MetaLearner


class MetaSgd(MetaLearner):
    name = "metasgd"
    rate_shape = "element"
