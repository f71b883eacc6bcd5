"""The names of backends, precisions, decode modes and checkpoint choices: one table, free of heavy imports (the CLI builds its options from it)."""

from __future__ import annotations

BACKENDS = ("torch", "compile", "onnxruntime", "openvino")
# Floating-point precisions, for inference and training (folded.PRECISIONS maps them to torch dtypes).
FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
# What inference runs at: the float ones, and int8 for INT8 model folders (quantize.py).
RUN_PRECISIONS = (*FLOAT_PRECISIONS, "int8")
# The element type OpenVINO is asked to compute in, for the float precisions its CPU plugin runs.
OPENVINO_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
DECODE_MODES = ("exact", "fast")
# Class-activation map methods of `explain` and /v1/explain (explain.py: grad-cam's GradCAM and EigenCAM).
EXPLAIN_METHODS = ("gradcam", "eigencam")
# How `search` finds neighbours (auto: faiss from 100,000 vectors when it is installed, else exact).
SEARCH_ENGINES = ("auto", "exact", "faiss")
# quantize: calibration images, held-out images and the agreement under which the INT8 model is refused
# (here, free of torch, because `ecanfnet quantize --help` shows them).
DEFAULT_SAMPLES, DEFAULT_HOLDOUT, DEFAULT_MIN_AGREEMENT = 300, 100, 0.90
# How a weights source names a Hugging Face Hub repository (hf-hub:OWNER/REPO, as timm writes it, or hf_hub:).
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# Architectures a checkpoint may name (model.CONFIGS holds their layouts).
ARCHITECTURES = ("eca_nfnet_l0", "eca_nfnet_l1", "eca_nfnet_l2", "eca_nfnet_l3")
# How the eval transform fits an image to the input size, and the resampling filters a checkpoint may name.
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
