"""Deployment: CPU inference, exports checked against PyTorch, ONNX files as weights, and INT8 quantization."""
