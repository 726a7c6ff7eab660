"""prunekit: prune trained PyTorch models into smaller dense models, recover, evaluate, export."""
from .config import Config, ConfigError, config_from_dict
from .api import PruneResult, prune
from .graph import DependencyGraph, GraphError, Group
from .structured import MACs, Params, Structured
from .flops import count_macs, count_params
from .io import LoadError, load, save

__version__ = "0.1.0"
