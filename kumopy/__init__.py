"""kumopy: a multi-IP SMTP sender with KumoMTA's egress sources and pools."""

from kumopy.errors import ConfigError, KumoError
from kumopy.policy import kumo

__all__ = ["ConfigError", "KumoError", "__version__", "kumo"]

__version__ = "0.1.0"
