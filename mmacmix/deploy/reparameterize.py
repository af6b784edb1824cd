"""Re-parameterising a trained X-volution model into its deployed form.

:func:`reparameterize` builds the model of a config, loads a trained
checkpoint strictly, turns every X-volution into its single-operator form
(branch norms folded, branches merged), checks that the backbone's outputs
did not change, and writes the deployed checkpoint atomically. It returns
the ``--cfg-options`` under which the config loads the new file (e.g.
``model.backbone.deploy=True``), after checking that they do.
"""

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mmacmix.apis.runner import build_model, load_config
from mmacmix.checkpoint import (
    load_state_dict_strictly,
    read_checkpoint,
    save_atomically,
    state_dict_of,
)
from mmacmix.fileio import check_destination
from mmacmix.models.xvolution import XVolution
from mmacmix.models.xvolution_resnet import XVolutionResNet

# Types whose config takes ``deploy=True`` to build the deployed form.
DEPLOYABLE = ('XVolution', 'XVolutionResNet')
# Relative change of the backbone's outputs tolerated by the check.
TOLERANCE = 1e-4


def deploy_options(cfg: Mapping, prefix: str = 'model') -> list[str]:
    """Finds the config dicts of X-volution ops and backbones.

    Args:
        cfg (Mapping): A model config (nested dicts).
        prefix (str): The dotted path of ``cfg``. Defaults to ``'model'``.

    Returns:
        list[str]: ``--cfg-options`` entries, e.g.
        ``['model.backbone.deploy=True']``; none inside an already deployable
        one (a backbone's ``deploy`` covers its ops).
    """
    kind = cfg.get('type')
    if isinstance(kind, str) and kind.rpartition('.')[2] in DEPLOYABLE:
        return [f'{prefix}.deploy=True']
    options = []
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            options += deploy_options(value, f'{prefix}.{key}')
    return options


def switch_to_deploy(model: nn.Module, strict: bool = True) -> None:
    """Turns every X-volution of ``model`` into its deployed form.

    Backbones first (they also keep frozen stages frozen), then ops put
    into other backbones through ``build_conv_layer``; both are idempotent.

    Args:
        model (nn.Module): Any model; changed in place.
        strict (bool): Raise for X-volutions that have no deployed form
            (``attention='global'``); otherwise they keep their training
            form, which computes the same in eval mode. Defaults to True.

    Raises:
        ValueError: If ``strict`` and an X-volution cannot be deployed.
    """
    for module in list(model.modules()):
        if isinstance(module, (XVolutionResNet, XVolution)) and (
            strict or module.attention == 'pssa'
        ):
            module.switch_to_deploy()


@torch.no_grad()
def probe(model: nn.Module, channels: int = 3) -> list[Tensor]:
    """Runs the backbone (or the model) on a fixed random image batch."""
    net = getattr(model, 'backbone', model)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(1, channels, 64, 64, generator=generator)
    outs = net.eval()(images)
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]


def reparameterize(
    config: str,
    checkpoint: str,
    out: str,
    cfg_options: dict | None = None,
    force: bool = False,
    trust: bool = False,
) -> list[str]:
    """Writes the deployed form of a trained model; see the module doc.

    Args:
        config (str): Config of the trained model.
        checkpoint (str): Trained checkpoint (``{'state_dict': ...}`` or a
            bare state dict).
        out (str): Deployed checkpoint to write.
        cfg_options (dict, optional): Overrides of the config. Defaults to
            None.
        force (bool): Overwrite an existing ``out``. Defaults to False.
        trust (bool): Unpickle ``checkpoint`` even if it holds more than
            weights (see :func:`mmacmix.checkpoint.read_checkpoint`).
            Defaults to False.

    Returns:
        list[str]: The ``--cfg-options`` entries that load ``out``.

    Raises:
        OSError: If ``out`` exists (and ``force`` is False) or cannot be
            written, or ``checkpoint`` cannot be read (checked first).
        ValueError: If the checkpoint is no checkpoint, needs more than
            weights (and ``trust`` is False) or is deployed already, the
            model has no X-volution, or the outputs changed.
        KeyMismatchError: If the checkpoint does not fit the config's
            model.
    """
    check_destination(out, force, 'checkpoint')
    source = read_checkpoint(checkpoint, trust=trust)
    state_dict = state_dict_of(source, checkpoint)
    meta = source.get('meta') if 'state_dict' in source else None
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    if meta.get('deploy') or any(
        key.endswith('.dynamic_weight') for key in state_dict
    ):
        loaded_with = ' '.join(meta.get('cfg_options') or []) or (
            'model.backbone.deploy=True'
        )
        raise ValueError(
            f'{checkpoint!r} is re-parameterised (deployed) already; '
            f'expected a trained checkpoint. Load it as it is, with '
            f'--cfg-options {loaded_with}'
        )
    cfg = load_config(config, cfg_options=cfg_options)
    options = deploy_options(cfg.model)
    if not options:
        raise ValueError(
            f'{config} has no X-volution: no config dict of type '
            f'{" or ".join(DEPLOYABLE)} under model'
        )
    model = build_model(cfg)
    load_state_dict_strictly(model, state_dict, checkpoint)
    model.eval()
    before = probe(model)
    switch_to_deploy(model)
    after = probe(model)
    for old, new in zip(before, after, strict=True):
        change = (old - new).abs().max() / old.abs().max().clamp_min(1e-12)
        if change > TOLERANCE:
            raise ValueError(
                f'the deployed backbone changed its outputs by {change:.2e} '
                '(relative); not written'
            )

    deployed = model.state_dict()
    # The returned options must build a model that takes the file as is.
    for option in options:
        cfg.merge_from_dict({option.split('=')[0]: True})
    load_state_dict_strictly(build_model(cfg), deployed, out)
    meta.update(deploy=True, cfg_options=options, source=checkpoint)
    save_atomically(dict(meta=meta, state_dict=deployed), out, force)
    return options
