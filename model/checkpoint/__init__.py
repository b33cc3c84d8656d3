"""Checkpoint readers: one interface over the released pickles, Hugging Face ports and our format.

```python
reader = open_checkpoint(path)      # detects the format
reader.format, reader.config        # "xai" | "hf" | "grokserve", GrokConfig
for name in reader.names():         # our parameter names, [in, out] orientation
    tensor = reader.read(name)      # torch.Tensor, or QuantizedWeight for 8-bit matrices
```
"""

from grokserve.model.checkpoint.base import CheckpointError, CheckpointReader, TensorInfo
from grokserve.model.checkpoint.detect import open_checkpoint
from grokserve.model.checkpoint.native import save_pretrained
from grokserve.model.checkpoint.unpickler import UnsafePickleError

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "TensorInfo",
    "UnsafePickleError",
    "open_checkpoint",
    "save_pretrained",
]
