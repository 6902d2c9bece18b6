"""minillama: LLaMA inference from scratch in NumPy, with CUDA kernels for matmul and softmax."""
from .errors import MiniLlamaError
from .model import ModelArgs, Transformer

__version__ = "0.1.0"
__all__ = ["MiniLlamaError", "ModelArgs", "Transformer", "__version__"]
