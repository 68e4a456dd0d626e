"""ANIL, "almost no inner loop" (Raghu et al. 2020): only the last layer adapts in the inner loop;
the body is meta-learned through it. The inner loop is as cheap as fitting a linear layer, and
test-time fine-tuning likewise changes the last layer only, at the budget picked on validation.
"""

from __future__ import annotations

from models.backbones import last_layer_names
from models.maml import MetaLearner


class Anil(MetaLearner):
    name = "anil"
    adaptation = "finetune-head"

    def inner_names(self) -> list[str]:
        head = last_layer_names(self.model)
        return [name for name, _ in self.model.named_parameters() if name in head]
