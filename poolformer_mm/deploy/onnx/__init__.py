"""ONNX export of the segmentors and detectors with the folded backbone, and its checks; needs
the optional ``deploy`` extra (onnx, onnxruntime), which the rest of the package never imports.
"""
from .export import build_model, export_onnx, fold_for_export
from .verify import verify_onnx

__all__ = ['build_model', 'export_onnx', 'fold_for_export', 'verify_onnx']
