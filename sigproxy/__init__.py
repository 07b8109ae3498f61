"""sigproxy: a SigV4 signing reverse proxy for AWS Lambda Function URLs."""

__version__ = "0.1.0"

from .app import create_proxy, serve
from .config import Config, load_config

__all__ = ["Config", "__version__", "create_proxy", "load_config", "serve"]
