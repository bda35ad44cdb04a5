"""The values a user picks from, in one torch-free place: `simimg --help` and the app's menus list them without
loading a model, and the modules that act on them import them from here."""

from __future__ import annotations

# backbones torchvision builds with ImageNet weights (models/net.py maps each to its builder and weights)
ARCHITECTURES = ("densenet121", "densenet169", "densenet201", "densenet161", "resnet50", "vgg16")
DEFAULT_ARCH = "densenet121"
# auto: bf16 where the device has native bf16 units, int8 only where a passed int8 gate is kept and the CPU has
# VNNI/AMX (models/device.py, models/int8.py); int8: quantized on the collection, used only if its gate passes
PRECISIONS = ("auto", "bf16", "fp32", "int8")
RUNTIMES = ("auto", "torch", "openvino")  # CPU inference runtime; auto: OpenVINO when installed
INDEX_KINDS = ("flat", "ivf", "ivfpq")  # FAISS structures (store/ann.py); "auto" picks one by size
ENGINES = ("local", "ray")  # where `simimg index` embeds: this process, or Ray Data
EXPLAIN_METHODS = ("gradcam", "gradcam++", "layercam")  # class activation maps (models/heatmaps.py)
EXPORT_FORMATS = ("onnx", "bundle")  # `simimg export` (models/export.py)
PROJECTIONS = ("pca", "tsne")  # the Inspect map and `SearchService.map_2d`: PCA (fast) or t-SNE
PREDICT_FORMATS = ("csv", "parquet", "jsonl")  # `simimg predict`'s output file (jobs/predict.py)
REVIEW_QUEUES = ("issues", "duplicates", "unlabeled", "class")  # `simimg.review_queue`: the Review page's queues
