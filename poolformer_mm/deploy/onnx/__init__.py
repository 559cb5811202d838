"""ONNX export and its checks; needs the optional ``deploy`` extra (onnx, onnxruntime)."""
from .export import build_model, export_onnx, fold_for_export
from .verify import verify_onnx

__all__ = ['build_model', 'export_onnx', 'fold_for_export', 'verify_onnx']
