"""sigproxy: a SigV4 signing reverse proxy for AWS Lambda Function URLs."""

from .app import create_app, serve
from .config import Config, load_config

__all__ = ["Config", "create_app", "load_config", "serve"]
__version__ = "0.1.0"
