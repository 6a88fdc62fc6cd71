"""Pure-maths models: the H-DNN family, baselines and the classifier network.

Nothing under this package imports ``torch.distributed``.
"""
from . import baselines  # noqa: F401  (registers MS1-MS3, ResNet, MLP)
from .hamiltonian import ARCHITECTURES, ODENet, build_model, j_matrix
from .network import Classifier, Embedding, InputPlacement, default_placement

__all__ = ["ARCHITECTURES", "ODENet", "build_model", "j_matrix", "Classifier", "Embedding",
           "InputPlacement", "default_placement"]
