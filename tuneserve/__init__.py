"""tuneserve: fine-tune pretrained CNNs, export to ONNX, serve GPU-batched over HTTP."""
__version__ = "0.1.0"
