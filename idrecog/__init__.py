"""idrecog: one unified multi-task model for identity-document recognition."""

from idrecog.errors import ConfigError, DataFormatError, IdrecogError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataFormatError", "IdrecogError", "__version__"]
