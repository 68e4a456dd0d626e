"""Every training method `landcover train --method` offers: adding one is a module under
`models/` and one line here."""

from __future__ import annotations

from models.anil import Anil
from models.learner import Learner
from models.maml import Fomaml, Maml
from models.maml_ga import MamlGa
from models.mamlpp import MamlPlusPlus
from models.metasgd import MetaSgd
from models.pretrain import Pretrain
from models.protonet import ProtoNet
from models.r2d2 import RidgeLearner
from models.reptile import Reptile

LEARNERS: dict[str, type[Learner]] = {
    learner.name: learner
    for learner in (
        ProtoNet,
        Reptile,
        Anil,
        MetaSgd,
        MamlPlusPlus,
        MamlGa,
        Maml,
        Fomaml,
        RidgeLearner,
        Pretrain,
    )
}
