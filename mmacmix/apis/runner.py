"""Training and testing any mmdet or mmseg config with MMEngine's Runner.

``tools/train.py`` and ``tools/test.py`` are thin command lines over
:func:`train` and :func:`test`. Beyond what OpenMMLab's own scripts do, these
functions make the stack of this project work as it is installed:

* Checkpoints load with ``weights_only=True`` and strict key matching
  (:class:`CheckedRunner`, :mod:`mmacmix.checkpoint`): ``load_from`` and
  ``--resume`` alike. ``trust=True`` (``--trust-checkpoint``) unpickles any
  file, ``strict=False`` (``--non-strict``) loads what fits, as MMEngine
  does.
* The checkpoint to evaluate, resume or start from is checked before any
  work: an unreadable file, or one whose keys do not fit the config's
  model, is an error that says what the file seems to hold and what to do
  with it (:func:`check_checkpoint`).
* ``--launcher pytorch`` / ``slurm`` work on a CPU-only torch (gloo), see
  :mod:`mmacmix.apis.dist`.
* Checkpoints are written atomically, ``--resume`` continues a run exactly
  and denormal floats are flushed while the run lasts: the hooks of
  :mod:`mmacmix.apis.hooks`, named in the config by
  :func:`~mmacmix.apis.hooks.add_project_hooks`.
* ``--amp`` on a machine without a GPU fails at once with a clear message.

:func:`build_model` is the one place a model is built from a config (the
checks here, re-parameterisation, ONNX export and FLOP counts use it).
"""

import importlib
import json
import os.path as osp
from collections.abc import Mapping, Sequence

from mmengine.config import Config, DictAction
from mmengine.device import get_device
from mmengine.model import is_model_wrapper, revert_sync_batchnorm
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner, find_latest_checkpoint
from torch import nn

from mmacmix.checkpoint import (
    KeyMismatchError,
    LoadAdvice,
    fetch_pretrained,
    load_state_dict_strictly,
    load_weights,
    read_checkpoint,
    state_dict_of,
    trusted_checkpoints,
)
from mmacmix.fileio import atomic_path, check_destination
from mmacmix.registry import RUNNERS

from .dist import setup_distributed
from .hooks import add_project_hooks

__all__ = [
    'CheckedRunner',
    'DictAction',
    'build_model',
    'build_runner',
    'check_checkpoint',
    'load_config',
    'test',
    'train',
]


def load_config(
    config: str,
    work_dir: str | None = None,
    cfg_options: dict | None = None,
) -> Config:
    """Reads a config and registers the modules of its codebase.

    The config's ``default_scope`` (``'mmdet'`` or ``'mmseg'``) names the
    package whose ``utils.register_all_modules`` is called, so one script
    serves detection and segmentation configs alike.

    Args:
        config (str): Path of the config file.
        work_dir (str, optional): Overrides ``cfg.work_dir``; by default it
            stays as the config sets it, else ``work_dirs/<config name>``.
        cfg_options (dict, optional): ``--cfg-options`` overrides, merged
            last.

    Returns:
        Config: The config, with ``work_dir`` set.
    """
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        name = osp.splitext(osp.basename(config))[0]
        cfg.work_dir = osp.join('work_dirs', name)
    scope = cfg.get('default_scope')
    if scope:
        try:
            utils = importlib.import_module(f'{scope}.utils')
        except ImportError as error:
            raise ImportError(
                f'the config {config!r} needs {scope!r} (its default_scope), '
                f'which cannot be imported: {error}'
            ) from error
        register = getattr(utils, 'register_all_modules', None)
        if register is not None:
            # The Runner sets the default scope itself, from the config.
            register(init_default_scope=False)
    return cfg


def build_model(cfg: Mapping, part: str | None = None) -> nn.Module:
    """Builds the model of a config, or one part of it, without weights.

    The one place mmacmix builds a model from a config: the checkpoint
    checks, re-parameterisation, ONNX export and FLOP counts use it.

    Args:
        cfg (Mapping): A config (from :func:`load_config` or
            ``Config.fromfile``) or any mapping with ``model`` and,
            optionally, ``default_scope`` (the registry its types are
            looked up in; types written ``scope.Name`` need none).
        part (str, optional): Build ``cfg['model'][part]`` instead, e.g.
            ``'backbone'``. Defaults to None (the whole model).

    Returns:
        nn.Module: The model, SyncBN replaced by BN (outside a distributed
        run there is no process group for it), weights as constructed:
        ``init_weights()`` is not called, nothing is read or downloaded.
    """
    model_cfg = cfg['model'] if part is None else cfg['model'][part]
    if part is None and cfg.get('data_preprocessor') is not None:
        # As the Runner does: mmpretrain configs set it beside the model.
        model_cfg = dict(model_cfg)
        model_cfg.setdefault('data_preprocessor', cfg['data_preprocessor'])
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        model = MODELS.build(model_cfg)
    return revert_sync_batchnorm(model)


@RUNNERS.register_module()
class CheckedRunner(Runner):
    """MMEngine's Runner loading checkpoints as the rest of mmacmix does.

    ``load_from`` and ``resume`` read the file with
    :func:`~mmacmix.checkpoint.read_checkpoint` (``weights_only=True``
    unless inside :func:`~mmacmix.checkpoint.trusted_checkpoints`) and load
    it with :func:`~mmacmix.checkpoint.load_weights`: strict key matching
    unless :attr:`strict_load` is False, when the keys that do not fit are
    logged as a warning, as MMEngine does. Everything else is MMEngine's
    ``Runner``. Registered: a config with
    ``runner_type = 'mmacmix.CheckedRunner'`` gets it from launchers that
    build the Runner themselves (``mim train``).
    """

    #: Whether checkpoints must fit the model exactly.
    strict_load: bool = True

    def load_checkpoint(
        self,
        filename: str,
        map_location='cpu',
        strict: bool | None = None,
        revise_keys: Sequence = ((r'^module.', ''),),
    ) -> dict:
        """Loads ``filename`` into the model (see the class doc).

        Args:
            filename (str): A local file or URL.
            map_location: As for ``torch.load``. Defaults to ``'cpu'``.
            strict (bool, optional): Defaults to :attr:`strict_load`.
            revise_keys (Sequence): ``(pattern, replacement)`` pairs applied
                to the keys. Defaults to removing a ``module.`` prefix.

        Returns:
            dict: The checkpoint.
        """
        checkpoint = read_checkpoint(filename, map_location=map_location)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        model = (
            self.model.module if is_model_wrapper(self.model) else self.model
        )
        strict = self.strict_load if strict is None else strict
        load_weights(model, checkpoint, filename, strict, revise_keys)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint


def build_runner(cfg: Config, strict: bool = True) -> CheckedRunner:
    """Builds the Runner of ``cfg``: a :class:`CheckedRunner`.

    Nothing else: the hooks that run are those ``cfg`` names (see
    :func:`~mmacmix.apis.hooks.add_project_hooks`), and nothing outside the
    Runner changes.

    Args:
        cfg (Config): A config prepared by :func:`load_config` (and
            :func:`mmacmix.apis.dist.setup_distributed` for a distributed
            run).
        strict (bool): Whether ``load_from`` and resumed checkpoints must
            fit the model exactly. Defaults to True.

    Returns:
        CheckedRunner: The runner, ready for ``train()`` or ``test()``.
    """
    runner = CheckedRunner.from_cfg(cfg)
    runner.strict_load = strict
    return runner


def train(
    config: str,
    work_dir: str | None = None,
    resume: str | bool = False,
    amp: bool = False,
    cfg_options: dict | None = None,
    launcher: str = 'none',
    strict: bool = True,
    trust: bool = False,
) -> Runner:
    """Trains the model of a config, as ``tools/train.py`` does.

    The checkpoint resumed from, or the config's ``load_from``, is checked
    first (:func:`check_checkpoint`); the project's hooks are named in the
    config (:func:`~mmacmix.apis.hooks.add_project_hooks`).

    Args:
        config (str): Path of an mmdet or mmseg config.
        work_dir (str, optional): Where logs and checkpoints go.
        resume (str | bool): ``True`` or ``'auto'`` resumes from the latest
            checkpoint of ``work_dir`` (starts afresh if there is none); a
            path resumes from that checkpoint. Defaults to False.
        amp (bool): Mixed precision (``AmpOptimWrapper``); needs a GPU.
        cfg_options (dict, optional): Config overrides, merged last.
        launcher (str): ``'none'``, ``'pytorch'`` or ``'slurm'``.
        strict (bool): Whether the checkpoint resumed or loaded from must
            fit the model exactly. Defaults to True.
        trust (bool): Unpickle any checkpoint read during the run
            (``weights_only=False``), not only weights: for files you
            trust. Defaults to False.

    Returns:
        Runner: The runner after training.

    Raises:
        ValueError: If ``amp`` is asked for on a machine without a GPU, or
            the checkpoint to resume from is no training checkpoint.
        KeyMismatchError: If that checkpoint does not fit the model.
        UntrustedCheckpointError: If a checkpoint needs more than weights
            and ``trust`` is False.
    """
    with trusted_checkpoints(trust):
        cfg = load_config(config, work_dir, cfg_options)
        if amp:
            enable_amp(cfg)
        checkpoint = cfg.get('load_from')
        if resume == 'auto' or resume is True:
            cfg.resume = True
            cfg.load_from = None
            checkpoint = find_latest_checkpoint(cfg.work_dir)
        elif resume:
            cfg.resume = True
            cfg.load_from = checkpoint = resume
        setup_distributed(cfg, launcher)
        if checkpoint:
            check_checkpoint(cfg, checkpoint, bool(resume), strict)
        else:
            # A config mistake (a mistyped type or argument) fails here,
            # before the Runner logs anything or makes its work folder.
            build_model(cfg)
        fetch_pretrained(cfg.model)
        runner = build_runner(add_project_hooks(cfg), strict=strict)
        runner.train()
    return runner


def enable_amp(cfg: Config) -> None:
    """Switches ``cfg`` to mixed precision training.

    Raises:
        ValueError: On a machine without a CUDA, NPU or MLU device, where
            MMEngine's ``AmpOptimWrapper`` cannot run.
    """
    if get_device() == 'cpu':
        raise ValueError(
            "--amp needs a GPU: MMEngine's AmpOptimWrapper supports CUDA, "
            'NPU and MLU devices only, and this machine has none. Drop '
            '--amp to train in float32 on the CPU.'
        )
    wrapper = cfg.optim_wrapper
    if wrapper.get('type') != 'AmpOptimWrapper':
        wrapper.type = 'AmpOptimWrapper'
        wrapper.setdefault('loss_scale', 'dynamic')


def test(
    config: str,
    checkpoint: str,
    work_dir: str | None = None,
    cfg_options: dict | None = None,
    launcher: str = 'none',
    metrics_out: str | None = None,
    strict: bool = True,
    trust: bool = False,
) -> dict:
    """Evaluates a checkpoint on the config's test split.

    Args:
        config (str): Path of an mmdet or mmseg config.
        checkpoint (str): The checkpoint to evaluate.
        work_dir (str, optional): Where logs go.
        cfg_options (dict, optional): Config overrides, merged last.
        launcher (str): ``'none'``, ``'pytorch'`` or ``'slurm'``.
        metrics_out (str, optional): Also writes the metrics to this JSON
            file (from the main process; its folder is created).
        strict (bool): Whether the checkpoint must fit the model exactly.
            Defaults to True (MMEngine loads non-strictly).
        trust (bool): Unpickle any checkpoint (``weights_only=False``), not
            only weights: for files you trust. Defaults to False.

    Returns:
        dict: The metrics, e.g. ``{'coco/bbox_mAP': 0.41, ...}``.

    Raises:
        OSError: If ``metrics_out`` cannot be written or the checkpoint
            cannot be read (checked before any work).
        ValueError: If the checkpoint is no checkpoint, or needs more than
            weights and ``trust`` is False.
        KeyMismatchError: If it does not fit the model (and ``strict``).
    """
    if metrics_out:
        check_destination(metrics_out, force=True, what='--metrics-out')
    with trusted_checkpoints(trust):
        cfg = load_config(config, work_dir, cfg_options)
        setup_distributed(cfg, launcher)
        check_checkpoint(cfg, checkpoint, strict=strict)
        cfg.load_from = checkpoint
        cfg.resume = False
        runner = build_runner(add_project_hooks(cfg), strict=strict)
        metrics = runner.test()
    metrics = {key: _plain(value) for key, value in metrics.items()}
    if metrics_out and runner.rank == 0:
        with atomic_path(metrics_out) as partial, open(partial, 'w') as file:
            json.dump(metrics, file, indent=2)
    return metrics


def check_checkpoint(
    cfg: Config,
    path: str,
    resume: bool = False,
    strict: bool = True,
) -> None:
    """Checks, before the Runner is built, that ``path`` fits ``cfg``.

    MMEngine loads checkpoints non-strictly: a file that does not fit the
    model (a backbone alone, a torchvision classifier) is evaluated as if
    it were trained, or trained from as if nothing were missing, with one
    warning in the log. Here the file is read (see
    :func:`~mmacmix.checkpoint.read_checkpoint`) and loaded strictly into a
    model built from ``cfg.model``, with the ``module.`` prefix removed as
    MMEngine does. The error says what the file seems to hold and how to
    use it with this config (as ``--cfg-options`` of ``tools/train.py``).

    Args:
        cfg (Config): The run's config, ready for the Runner.
        path (str): The checkpoint (a local file or URL).
        resume (bool): It must also hold the training state (``meta``
            with the epoch and iteration). Defaults to False.
        strict (bool): Whether the keys must fit; if not, only the file
            itself is checked. Defaults to True.

    Raises:
        OSError: If the file is missing or a folder.
        ValueError: If it is not a checkpoint, holds no state dict, needs
            more than weights (:class:`~mmacmix.checkpoint.
            UntrustedCheckpointError`) or, for ``resume``, holds no
            training state.
        KeyMismatchError: If ``strict`` and its keys or shapes do not fit
            ``cfg.model``; the message says what the file seems to hold.
    """
    checkpoint = read_checkpoint(path)
    state_dict = state_dict_of(checkpoint, path)
    meta = checkpoint.get('meta')
    trained = isinstance(meta, Mapping) and 'iter' in meta
    if not (strict or resume and not trained):
        return
    try:
        load_state_dict_strictly(
            build_model(cfg), state_dict, path, _advice(cfg, path, meta)
        )
    except KeyMismatchError as error:
        if trained or not resume:
            raise
        mismatch = f' It does not fit the model either: {error}'
    else:
        mismatch = (
            ' To start a new run from its weights (they fit the model), '
            f'use --cfg-options load_from={path} instead of --resume.'
        )
    if resume and not trained:
        raise ValueError(
            f'{path!r} holds no training state (no meta with the epoch and '
            'iteration); expected a checkpoint written by tools/train.py.'
            + mismatch
        )


def _advice(cfg: Config, path: str, meta) -> LoadAdvice:
    """The fixes of :func:`check_checkpoint`'s hints, as options of
    ``tools/train.py`` (or of the command at hand) for ``cfg``."""
    from mmacmix.deploy.reparameterize import deploy_options

    options = meta.get('cfg_options') if isinstance(meta, Mapping) else None
    options = options or deploy_options(cfg.model)
    config = getattr(cfg, 'filename', None) or 'CONFIG'

    def pretrained(checkpoint: str, prefix: str | None) -> str:
        init = 'model.backbone.init_cfg'
        return (
            f'tools/train.py {config} --cfg-options {init}.type=Pretrained '
            f'{init}.checkpoint={checkpoint}'
            + (f' {init}.prefix={prefix}' if prefix else '')
        )

    return LoadAdvice(
        source=path,
        pretrained=pretrained,
        deploy=f'add --cfg-options {" ".join(options)}'
        if options
        else 'load it with the X-volution config it was trained with',
        whole_model=True,
    )


def _plain(value):
    """Turns NumPy and torch scalars into plain Python numbers."""
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        return value.item()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
