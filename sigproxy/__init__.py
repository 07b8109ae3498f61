"""sigproxy: a SigV4 signing reverse proxy for AWS Lambda Function URLs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .app import create_proxy, serve
    from .config import Config, load_config

__all__ = ["Config", "__version__", "create_proxy", "load_config", "serve"]

# The public names load on first use, so `sigproxy` (the command) decides what is
# imported before botocore is (see sigproxy.cli.main).
_LAZY = {"create_proxy": "app", "serve": "app", "Config": "config", "load_config": "config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sigproxy' has no attribute {name!r}")
