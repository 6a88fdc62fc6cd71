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
import importlib
import os

# PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages when this is set. It is
# read once, at torch's first allocation, so it is set here, before dhdnn uses torch. A training
# step's large temporaries are fresh memory every step, and first-touching fresh 4 KiB pages
# (page faults, kernel zeroing) costs more than the arithmetic on them at 65,536 agents; with
# huge pages it is about 6x cheaper. Set THP_MEM_ALLOC_ENABLE=0 in the environment to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# public name -> the module defining it, imported on first use (PEP 562): ``import dhdnn`` costs
# nothing, so ``dhdnn train`` can start its workers' forkserver before it imports torch itself
_EXPORTS = {"sensitivity_matrices": "analysis", "sensitivity_norms": "analysis", "symplecticity_error": "analysis",
            "NetworkSpec": "build", "build_network": "build", "Config": "config", "ConfigError": "config",
            "load_config": "config", "Dataset": "data", "load_dataset": "data", "export_model": "export",
            "load_exported": "export", "ARCHITECTURES": "models", "Classifier": "models", "ODENet": "models",
            "build_model": "models", "partition": "partitioner", "train_from_config": "run", "Topology": "topology",
            "load_topology": "topology", "Trainer": "train"}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:  # a submodule (dhdnn.distributed, dhdnn.testing), as if the package had imported it
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.3.0"

__all__ = sorted(_EXPORTS)
