"""Pure-maths models: the H-DNN family, baselines and the classifier network.

Nothing under this package imports ``torch.distributed``.
"""
from . import baselines, conv  # noqa: F401  (register MS1-MS3, ResNet, MLP; the conv network)
from .hamiltonian import ARCHITECTURES, NotDistributable, ODENet, build_model, j_matrix
from .network import NETWORKS, Classifier, Embedding, InputPlacement, default_placement

__all__ = ["ARCHITECTURES", "NETWORKS", "NotDistributable", "ODENet", "build_model", "j_matrix", "Classifier",
           "Embedding", "InputPlacement", "default_placement"]
