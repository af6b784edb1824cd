"""Exporting mmacmix backbones to ONNX, with any input height and width.

The backbones are traced by PyTorch's TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``), which needs no extra package on
torch 2.13. Three things make the traced graphs size-independent:

* ACmix's local attention leaves its compiled kernel (which a tracer cannot
  see into) for a gather formulation built from the traced sizes while
  exporting (see :mod:`mmacmix.ops.local_attention`);
* X-volution is exported in its deployed, single-operator form
  (``switch_to_deploy()``);
* ACmix-Swin computes its padding and shifted-window masks from the traced
  sizes. Its window side and shift, though, are chosen in Python from the
  map size (a stage not larger than the window uses a smaller one), so one
  graph serves the sizes that choose as the traced one did: every stage
  larger than the window, i.e. sides of at least :func:`min_input_side`
  (225 pixels for patch 4, window 7, four stages). The exporter traces at
  such a size and records the bound in the model's metadata.

:func:`export_onnx` writes the file atomically and checks it against
PyTorch with onnxruntime before it is renamed into place, so a failed export
leaves nothing behind.
"""

import ast
import json
import logging
import os.path as osp
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mmacmix.checkpoint import (
    DownloadError,
    fetch_pretrained,
    trusted_checkpoints,
)
from mmacmix.fileio import atomic_path, check_destination
from mmacmix.models.utils import load_pretrained, read_state_dict

from .reparameterize import switch_to_deploy

__all__ = [
    'build_backbone',
    'export_onnx',
    'load_backbone_cfg',
    'min_input_side',
    'verify_onnx',
]

# Maximum absolute difference tolerated between onnxruntime and PyTorch:
# float32 rounding of a few hundred chained operators stays far below it.
DEFAULT_ATOL = 1e-4
DEFAULT_OPSET = 17  # LayerNormalization is native from opset 17


def load_backbone_cfg(
    config: str | None = None,
    backbone_cfg: str | Mapping | None = None,
    cfg_options: Mapping | None = None,
) -> dict:
    """Returns a backbone config from a config file or a literal.

    Args:
        config (str, optional): An mmdet/mmseg/mmengine config file; its
            ``model.backbone`` is used.
        backbone_cfg (str | Mapping, optional): The backbone config itself:
            a dict, a path to a JSON file, or a JSON / Python dict literal
            such as ``"dict(type='mmacmix.ACmixResNet', depth=26)"`` or
            ``'{"type": "mmacmix.ACmixResNet", "depth": 26}'``.
        cfg_options (Mapping, optional): ``--cfg-options`` overrides,
            merged last; a literal ``backbone_cfg`` is ``model.backbone``
            for them too (``model.backbone.init_cfg=None``).

    Raises:
        ValueError: If neither or both are given, the literal is no dict, or
            the config has no ``model.backbone``.
        FileNotFoundError: If ``config`` does not exist.
    """
    from mmengine.config import Config

    if (config is None) == (backbone_cfg is None):
        raise ValueError('give exactly one of config and backbone_cfg')
    if config is not None:
        if not osp.isfile(config):
            raise FileNotFoundError(f'config {config!r} does not exist')
        cfg = Config.fromfile(config)
    elif isinstance(backbone_cfg, Mapping):
        cfg = Config(dict(model=dict(backbone=_plain(backbone_cfg))))
    elif osp.isfile(backbone_cfg):
        with open(backbone_cfg) as file:
            literal = _checked_dict(json.load(file), backbone_cfg)
        cfg = Config(dict(model=dict(backbone=literal)))
    else:
        literal = _checked_dict(_parse_literal(backbone_cfg), backbone_cfg)
        cfg = Config(dict(model=dict(backbone=literal)))
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    model = cfg.get('model')
    if not isinstance(model, Mapping) or not isinstance(
        model.get('backbone'), Mapping
    ):
        raise ValueError(f'{config} has no model.backbone to export')
    backbone = _plain(model['backbone'])
    scope = cfg.get('default_scope')
    if scope and '.' not in backbone.get('type', '.'):
        # A backbone of the config's codebase (mmdet's ResNet in the
        # drop-in configs) is built from that codebase's registry.
        backbone['type'] = f'{scope}.{backbone["type"]}'
    return backbone


def _parse_literal(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        tree = ast.parse(text.strip(), mode='eval')
    except SyntaxError as error:
        raise ValueError(
            f'--backbone-cfg {text!r} is neither JSON nor a dict literal: '
            f'{error}'
        ) from error
    try:
        return ast.literal_eval(_literal_dicts(tree.body))
    except ValueError as error:
        raise ValueError(
            f'--backbone-cfg {text!r} may hold only literals: {error}'
        ) from error


def _literal_dicts(node: ast.AST) -> ast.AST:
    """Rewrites ``dict(k=v)`` calls as ``{'k': v}`` literals.

    Only literals are then evaluated: no name is looked up, nothing called.
    """

    class Rewriter(ast.NodeTransformer):
        def visit_Call(self, call: ast.Call) -> ast.AST:
            self.generic_visit(call)
            if (
                isinstance(call.func, ast.Name)
                and call.func.id == 'dict'
                and not call.args
            ):
                return ast.Dict(
                    keys=[ast.Constant(k.arg) for k in call.keywords],
                    values=[k.value for k in call.keywords],
                )
            return call

    return ast.fix_missing_locations(Rewriter().visit(node))


def _checked_dict(value: object, source: str) -> dict:
    if not isinstance(value, dict) or 'type' not in value:
        raise ValueError(
            f'the backbone config {source!r} must be a dict with a type, '
            f'got {value!r}'
        )
    return _plain(value)


def _plain(cfg: Mapping) -> dict:
    """Deep-copies a (ConfigDict) mapping into plain dicts and lists."""
    if isinstance(cfg, Mapping):
        return {key: _plain(value) for key, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_plain(value) for value in cfg)
    return cfg


def build_backbone(
    cfg: Mapping, checkpoint: str | None = None, trust: bool = False
) -> nn.Module:
    """Builds a backbone for export: weights loaded, eval mode, deployed.

    Args:
        cfg (Mapping): The backbone config (``type='mmacmix....'``).
        checkpoint (str, optional): Weights to load strictly: a converted
            backbone checkpoint or a detector / segmentor checkpoint (its
            ``backbone.`` keys are used), or a bare backbone state dict.
            Without it the config's ``init_cfg`` decides (a ``Pretrained``
            entry must exist: a missing file raises ``FileNotFoundError``
            naming it; a URL is downloaded first, and one that cannot be
            raises ``OSError`` naming it and how to do without).
        trust (bool): Unpickle checkpoints that hold more than weights
            (see :func:`mmacmix.checkpoint.read_checkpoint`). Defaults to
            False.

    Returns:
        nn.Module: The backbone in eval mode, SyncBN replaced by BN and
        re-parameterisable ops (X-volution) in their deployed form.
    """
    from mmengine.logging import MMLogger

    import mmacmix.models  # noqa: F401  (registers the backbones)
    from mmacmix.apis.runner import build_model

    cfg = _plain(cfg)
    with trusted_checkpoints(trust):
        state_dict = None
        if checkpoint is not None:
            state_dict = read_state_dict(checkpoint)
            # The given weights replace whatever init_cfg would load.
            cfg.pop('init_cfg', None)
            if any(key.endswith('.dynamic_weight') for key in state_dict):
                # Written after switch_to_deploy() (mmacmix.deploy.
                # reparameterize): only the deployed form has these keys.
                # In a drop-in backbone the X-volution op is the dcn entry.
                target = (
                    cfg['dcn'] if isinstance(cfg.get('dcn'), dict) else cfg
                )
                target['deploy'] = True
        model = build_model(dict(model=cfg))
        if state_dict is None:
            try:
                fetch_pretrained(cfg)
            except DownloadError as error:
                raise OSError(
                    f'{error.source} ({error.url}), the init_cfg of the '
                    f'backbone, could not be downloaded ({error.reason}): '
                    'pass a CHECKPOINT to export, or --cfg-options '
                    'model.backbone.init_cfg=None to export random weights '
                    f'(or copy the file to {error.path})'
                ) from None
            # MMEngine logs every parameter's initialisation at INFO level.
            logger = MMLogger.get_current_instance()
            level = logger.level
            logger.setLevel(logging.WARNING)
            try:
                model.init_weights()
            finally:
                logger.setLevel(level)
        else:
            prefix = 'backbone.'
            if not any(key.startswith(prefix) for key in state_dict):
                prefix = None
            load_pretrained(model, checkpoint, prefix)
    model.eval()  # mmdet's ResNet.train() returns None, not the module
    switch_to_deploy(model, strict=False)
    return model


def min_input_side(model: nn.Module) -> int:
    """Returns the smallest image side the exported graph is valid for.

    1 for the convolutional backbones. For Swin-like backbones (with
    ``window_size``, ``patch_size`` through ``patch_embed``, ``layers``),
    the side for which the last stage is still larger than the window, so
    that every stage uses the full window and the shifts, as at tracing.
    """
    window = getattr(model, 'window_size', None)
    layers = getattr(model, 'layers', None)
    patch = getattr(getattr(model, 'patch_embed', None), 'patch_size', None)
    if window is None or layers is None or patch is None:
        return 1
    return patch * 2 ** (len(layers) - 1) * window + 1


def export_onnx(
    model: nn.Module,
    path: str,
    sample_size: Sequence[int] | None = None,
    verify_sizes: Sequence[Sequence[int]] | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    force: bool = False,
) -> dict[tuple[int, int], float]:
    """Exports a backbone with dynamic batch, height and width.

    The model is put in eval mode and, if it has ``switch_to_deploy``
    (X-volution), into its deployed form, in place. The graph has one input
    ``input`` (``(N, C, H, W)``) and one output per returned stage,
    ``out0``, ``out1``... It is written to a temporary file beside
    ``path``, checked with onnxruntime against PyTorch at every size of
    ``verify_sizes`` (batch 2), and only then renamed to ``path``.

    Args:
        model (nn.Module): A backbone from :func:`build_backbone`.
        path (str): The ``.onnx`` file to write.
        sample_size (Sequence[int], optional): ``(H, W)`` of the traced
            input. Defaults to 256x256 or :func:`min_input_side` rounded up
            to a multiple of 32, whichever is larger.
        verify_sizes (Sequence[Sequence[int]], optional): ``(H, W)`` sizes
            to compare at; empty to skip the check. Defaults to the traced
            size and one 32 + 29 x 17 pixels larger (odd, so that every
            padding differs from the traced one).
        opset (int): ONNX opset. Defaults to 17.
        atol (float): Largest absolute difference accepted. Defaults to
            1e-4.
        force (bool): Overwrite an existing ``path``. Defaults to False.

    Returns:
        dict: The largest absolute difference at each verified size.

    Raises:
        OSError: If ``path`` exists (and ``force`` is False) or cannot be
            written.
        ValueError: If a size is below :func:`min_input_side` or the graph
            differs from PyTorch by more than ``atol``.
    """
    check_destination(path, force, 'ONNX file')
    least = min_input_side(model)
    if sample_size is None:
        side = max(256, -(-least // 32) * 32)
        sample_size = (side, side)
    if verify_sizes is None:
        verify_sizes = [
            tuple(sample_size),
            (sample_size[0] + 61, sample_size[1] + 17),
        ]
    for size in [sample_size, *verify_sizes]:
        if min(size) < least:
            raise ValueError(
                f'{type(model).__name__} exports for sides of at least '
                f'{least} pixels (every stage larger than its window); got '
                f'{tuple(size)}'
            )
    channels = getattr(model, 'in_channels', 3)
    model.eval()
    # X-volution's training form is two branches and two norms; what is
    # deployed (and traced to a size-independent graph) is one op. The
    # global-attention form has no deployed form and is traced as it is.
    switch_to_deploy(model, strict=False)
    sample = torch.randn(1, channels, *sample_size)
    with torch.no_grad():
        num_outputs = len(_as_tuple(model(sample)))
    outputs = [f'out{i}' for i in range(num_outputs)]
    axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
    for i, name in enumerate(outputs):
        axes[name] = {0: 'batch', 2: f'height{i}', 3: f'width{i}'}

    with atomic_path(path) as partial:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (sample,),
                partial,
                dynamo=False,
                input_names=['input'],
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=opset,
            )
        _add_metadata(partial, model, least)
        diffs = verify_onnx(partial, model, verify_sizes, atol)
    return diffs


def _add_metadata(path: str, model: nn.Module, least: int) -> None:
    import onnx

    proto = onnx.load(path)
    entries = {
        'mmacmix_backbone': type(model).__name__,
        'min_input_side': str(least),
    }
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(proto, path)


def verify_onnx(
    path: str,
    model: nn.Module,
    sizes: Sequence[Sequence[int]],
    atol: float = DEFAULT_ATOL,
    batch: int = 2,
) -> dict[tuple[int, int], float]:
    """Compares an exported graph with the PyTorch model.

    Args:
        path (str): The ``.onnx`` file.
        model (nn.Module): The model it was exported from, in eval mode.
        sizes (Sequence[Sequence[int]]): ``(H, W)`` input sizes.
        atol (float): Largest absolute difference accepted. Defaults to
            1e-4.
        batch (int): Batch size of the inputs. Defaults to 2.

    Returns:
        dict: The largest absolute difference over all outputs, per size.

    Raises:
        ValueError: If shapes differ or a difference exceeds ``atol``.
    """
    if not sizes:
        return {}
    import onnxruntime

    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider']
    )
    channels = getattr(model, 'in_channels', 3)
    generator = torch.Generator().manual_seed(0)
    diffs = {}
    for size in sizes:
        size = tuple(int(s) for s in size)
        images = torch.randn(batch, channels, *size, generator=generator)
        with torch.no_grad():
            expected = _as_tuple(model(images))
        try:
            got = session.run(None, {'input': images.numpy()})
        except Exception as error:  # onnxruntime's own exception types
            raise ValueError(
                f'the ONNX graph fails at input {size}: {error}'
            ) from error
        worst = 0.0
        for index, (ours, theirs) in enumerate(zip(got, expected)):
            if tuple(ours.shape) != tuple(theirs.shape):
                raise ValueError(
                    f'output {index} at input {size}: ONNX shape '
                    f'{tuple(ours.shape)}, PyTorch {tuple(theirs.shape)}'
                )
            diff = (torch.from_numpy(ours) - theirs).abs().max().item()
            worst = max(worst, diff)
        if not worst <= atol:  # also catches NaN
            raise ValueError(
                f'the ONNX graph differs from PyTorch by {worst:.3g} at '
                f'input {size} (tolerance {atol:g}); not written'
            )
        diffs[size] = worst
    return diffs


def _as_tuple(outputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(outputs, Tensor):
        return (outputs,)
    return tuple(outputs)
