"""dhdnn: sparse Hamiltonian deep neural networks trained across processes.

Public API::

    load_topology, Topology.from_networkx, Topology.from_dict  # agent graphs
    build_network(topology, arch=, layers=, h=, n_features=, n_outputs=, task=)  # the dense network
    dhdnn.distributed.distribute(model)                      # this rank's share, after init_process_group
    load_exported(path)                                      # a saved network (export file, run or checkpoint
                                                             # directory), dense, in one process
    export_model(model, path)                                # one dense file
    build_model(name, dim, layers, h, mask=None, **options)  # an H-DNN layer stack; ARCHITECTURES
    partition, load_dataset, load_config, Trainer, train_from_config
    sensitivity_norms, symplecticity_error                   # gradient analysis
"""
import os

# PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when this is set. It is
# read once, at torch's first allocation, so it is set here, before dhdnn uses torch. A training
# step's large temporaries are fresh memory every step, and first-touching fresh 4 KiB pages
# (page faults, kernel zeroing) costs more than the arithmetic on them at 65,536 agents; with
# huge pages it is about 6x cheaper. Set THP_MEM_ALLOC_ENABLE=0 in the environment to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .analysis import sensitivity_matrices, sensitivity_norms, symplecticity_error
from .build import NetworkSpec, build_network
from .config import Config, ConfigError, load_config
from .data import Dataset, load_dataset
from .export import export_model, load_exported
from .models import ARCHITECTURES, Classifier, ODENet, build_model
from .partition import partition
from .run import train_from_config
from .topology import Topology, load_topology
from .train import Trainer

__version__ = "0.2.0"

__all__ = ["ARCHITECTURES", "Classifier", "Config", "ConfigError", "Dataset", "NetworkSpec", "ODENet", "Topology",
           "Trainer", "build_model", "build_network", "export_model", "load_config", "load_dataset",
           "load_exported", "load_topology", "partition", "sensitivity_matrices", "sensitivity_norms",
           "symplecticity_error", "train_from_config"]
