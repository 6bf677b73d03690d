"""minigrok: compact decoder-only transformers — build, train, compress and serve them.

`import minigrok` stays light: triton, transformers and matplotlib load only where they are used.
"""

from .config import ConfigError, ModelConfig
from .model import KVCache, MiniGrok, ModelOutput

__version__ = "0.1.0"

__all__ = ["ConfigError", "KVCache", "MiniGrok", "ModelConfig", "ModelOutput", "__version__"]
