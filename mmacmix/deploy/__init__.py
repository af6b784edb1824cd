"""Deployment: ONNX export and X-volution re-parameterisation."""

from .onnx import (
    DEFAULT_ATOL,
    DEFAULT_OPSET,
    build_backbone,
    export_onnx,
    load_backbone_cfg,
    min_input_side,
    verify_onnx,
)
from .reparameterize import deploy_options, reparameterize, switch_to_deploy

__all__ = [
    'DEFAULT_ATOL',
    'DEFAULT_OPSET',
    'build_backbone',
    'deploy_options',
    'export_onnx',
    'load_backbone_cfg',
    'min_input_side',
    'reparameterize',
    'switch_to_deploy',
    'verify_onnx',
]
