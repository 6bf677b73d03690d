"""minigrok: compact decoder-only transformers — build, train, compress and serve them.

`import minigrok` stays light: triton, transformers and matplotlib load only where they are used.
"""

from .config import ConfigError, ModelConfig
from .model import KVCache, MiniGrok, ModelOutput
from .speculative import SpeculativeStats

__version__ = "0.1.0"

__all__ = ["ConfigError", "KVCache", "MiniGrok", "ModelConfig", "ModelOutput", "SpeculativeStats", "__version__"]
