"""dhdnn: sparse Hamiltonian deep neural networks trained across processes.

Public API::

    build_model(name, dim, layers, h, mask=None, **options)  # an H-DNN layer stack
    ARCHITECTURES                                            # name -> class registry
    Classifier, load_dataset, load_config, Trainer
    sensitivity_norms, symplecticity_error                   # gradient analysis
"""
from .analysis import sensitivity_matrices, sensitivity_norms, symplecticity_error
from .config import Config, ConfigError, load_config
from .data import Dataset, load_dataset
from .models import ARCHITECTURES, Classifier, ODENet, build_model
from .train import Trainer, train_from_config

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "Classifier", "Config", "ConfigError", "Dataset", "ODENet", "Trainer",
           "build_model", "load_config", "load_dataset", "sensitivity_matrices", "sensitivity_norms",
           "symplecticity_error", "train_from_config"]
