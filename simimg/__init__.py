"""simimg: fine-tune a DenseNet on your folders, embed every image, search them with FAISS."""

from simimg.errors import SimimgError

__all__ = ["SimimgError", "__version__"]
__version__ = "0.1.0"
