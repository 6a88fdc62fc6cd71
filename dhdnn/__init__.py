"""dhdnn: sparse Hamiltonian deep neural networks trained across processes.

Public API::

    build_model(name, dim, layers, h, mask=None, **options)  # an H-DNN layer stack
    ARCHITECTURES                                            # name -> class registry
    load_topology, partition                                 # agent graphs and their placement
    Classifier, load_dataset, load_config, Trainer, train_from_config
    load_exported                                            # a trained network, dense, from `dhdnn export`
    sensitivity_norms, symplecticity_error                   # gradient analysis
"""
from .analysis import sensitivity_matrices, sensitivity_norms, symplecticity_error
from .config import Config, ConfigError, load_config
from .data import Dataset, load_dataset
from .export import load_exported
from .models import ARCHITECTURES, Classifier, ODENet, build_model
from .partition import partition
from .run import train_from_config
from .topology import load_topology
from .train import Trainer

__version__ = "0.2.0"

__all__ = ["ARCHITECTURES", "Classifier", "Config", "ConfigError", "Dataset", "ODENet", "Trainer",
           "build_model", "load_config", "load_dataset", "load_exported", "load_topology", "partition",
           "sensitivity_matrices", "sensitivity_norms", "symplecticity_error", "train_from_config"]
