"""prunekit: prune trained PyTorch models into smaller dense models, recover, evaluate, export."""
from .config import Config, ConfigError, config_from_dict
from .api import PruneResult, prune

__version__ = "0.1.0"
