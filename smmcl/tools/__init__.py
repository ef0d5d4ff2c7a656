"""Command-line tools beyond the authors' train / eval: cost report, ONNX export, feature-space and
qualitative pictures. Each imports its optional library (onnx, onnxruntime, scikit-learn) where it
needs it, so training never does."""
