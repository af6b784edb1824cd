"""Training and testing any mmdet or mmseg config with MMEngine's Runner.

``tools/train.py`` and ``tools/test.py`` are thin command lines over
:func:`train` and :func:`test`. Beyond what OpenMMLab's own scripts do, these
functions make the stack of this project work as it is installed:

* Runner checkpoints load on torch >= 2.6 (whose ``torch.load`` defaults to
  ``weights_only=True``), see :func:`allow_full_checkpoint_loading`.
* ``--launcher pytorch`` / ``slurm`` work on a CPU-only torch (gloo), see
  :mod:`mmacmix.apis.dist`.
* Checkpoints are written atomically and ``--resume`` continues a run
  exactly (:mod:`mmacmix.apis.hooks`).
* ``--amp`` on a machine without a GPU fails at once with a clear message.
* The checkpoint to evaluate or resume from is checked before any work:
  an unreadable file, or one whose keys do not fit the config's model, is
  an error that says what the file seems to hold (:func:`check_checkpoint`;
  ``strict=False`` loads it anyway, as MMEngine does).
"""

import importlib
import json
import os.path as osp
from collections.abc import Mapping, Sequence

import torch
from mmengine.config import Config, DictAction
from mmengine.device import get_device
from mmengine.hooks import CheckpointHook
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import CheckpointLoader, Runner, find_latest_checkpoint

from mmacmix.checkpoint import (
    load_state_dict_strictly,
    read_checkpoint,
    state_dict_of,
)
from mmacmix.fileio import atomic_path, check_destination

from .dist import setup_distributed
from .hooks import AtomicCheckpointHook, ExactResumeHook

__all__ = [
    'DictAction',
    'allow_full_checkpoint_loading',
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


def allow_full_checkpoint_loading() -> None:
    """Lets MMEngine load Runner checkpoints from local files on torch>=2.6.

    MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``; torch
    2.6 changed that default to True, which refuses Runner checkpoints (their
    message hub and metadata hold more than tensors). This replaces only
    MMEngine's loader for local paths, by one that passes
    ``weights_only=False`` as torch did before 2.6: load checkpoints you
    trust, as with any pickle. URLs and other schemes are untouched.
    """

    def load_local(filename: str, map_location=None):
        filename = osp.expanduser(filename)
        if not osp.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(
            filename, map_location=map_location, weights_only=False
        )

    CheckpointLoader.register_scheme(
        prefixes='', loader=load_local, force=True
    )


def build_runner(cfg: Config) -> Runner:
    """Builds the Runner of ``cfg`` with this project's hooks installed.

    The ``CheckpointHook`` of ``cfg.default_hooks`` (if any) is replaced by
    an :class:`AtomicCheckpointHook` with the same arguments, and an
    :class:`ExactResumeHook` is added unless the config names one. The
    config itself is unchanged, so the copy the Runner writes to the work
    folder runs anywhere.

    Args:
        cfg (Config): A config prepared by :func:`load_config` (and
            :func:`mmacmix.apis.dist.setup_distributed` for a distributed
            run).

    Returns:
        Runner: The runner, ready for ``train()`` or ``test()``.
    """
    # Randomly initialised detectors produce denormal floats, which make
    # some CPU steps ten times slower; flushing them changes no result.
    torch.set_flush_denormal(True)
    allow_full_checkpoint_loading()
    runner = Runner.from_cfg(cfg)
    for index, hook in enumerate(runner.hooks):
        if type(hook) is CheckpointHook:
            args = {
                key: value
                for key, value in cfg.default_hooks.checkpoint.items()
                if key not in ('type', '_scope_')
            }
            atomic = AtomicCheckpointHook(**args)
            atomic.priority = hook.priority
            runner.hooks[index] = atomic
    if not any(isinstance(hook, ExactResumeHook) for hook in runner.hooks):
        runner.register_hook(ExactResumeHook())
    return runner


def train(
    config: str,
    work_dir: str | None = None,
    resume: str | bool = False,
    amp: bool = False,
    cfg_options: dict | None = None,
    launcher: str = 'none',
    strict: bool = True,
) -> Runner:
    """Trains the model of a config, as ``tools/train.py`` does.

    Args:
        config (str): Path of an mmdet or mmseg config.
        work_dir (str, optional): Where logs and checkpoints go.
        resume (str | bool): ``True`` or ``'auto'`` resumes from the latest
            checkpoint of ``work_dir`` (starts afresh if there is none); a
            path resumes from that checkpoint. Defaults to False.
        amp (bool): Mixed precision (``AmpOptimWrapper``); needs a GPU.
        cfg_options (dict, optional): Config overrides, merged last.
        launcher (str): ``'none'``, ``'pytorch'`` or ``'slurm'``.
        strict (bool): Whether the checkpoint resumed from must fit the
            model exactly. Defaults to True.

    Returns:
        Runner: The runner after training.

    Raises:
        ValueError: If ``amp`` is asked for on a machine without a GPU, or
            the checkpoint to resume from is no training checkpoint.
        KeyMismatchError: If that checkpoint does not fit the model.
    """
    cfg = load_config(config, work_dir, cfg_options)
    if amp:
        enable_amp(cfg)
    checkpoint = None
    if resume == 'auto' or resume is True:
        cfg.resume = True
        cfg.load_from = None
        checkpoint = find_latest_checkpoint(cfg.work_dir)
    elif resume:
        cfg.resume = True
        cfg.load_from = checkpoint = resume
    setup_distributed(cfg, launcher)
    if checkpoint:
        check_checkpoint(cfg, checkpoint, resume=True, strict=strict)
    runner = build_runner(cfg)
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

    Returns:
        dict: The metrics, e.g. ``{'coco/bbox_mAP': 0.41, ...}``.

    Raises:
        OSError: If ``metrics_out`` cannot be written or the checkpoint
            cannot be read (checked before any work).
        ValueError: If the checkpoint is no checkpoint.
        KeyMismatchError: If it does not fit the model (and ``strict``).
    """
    if metrics_out:
        check_destination(metrics_out, force=True, what='--metrics-out')
    cfg = load_config(config, work_dir, cfg_options)
    setup_distributed(cfg, launcher)
    check_checkpoint(cfg, checkpoint, strict=strict)
    cfg.load_from = checkpoint
    cfg.resume = False
    runner = build_runner(cfg)
    metrics = runner.test()
    metrics = {key: _plain(value) for key, value in metrics.items()}
    if metrics_out and runner.rank == 0:
        with atomic_path(metrics_out) as partial, open(partial, 'w') as file:
            json.dump(metrics, file, indent=2)
    return metrics


def check_checkpoint(
    cfg: Config, path: str, resume: bool = False, strict: bool = True
) -> None:
    """Checks, before the Runner is built, that ``path`` fits ``cfg``.

    MMEngine loads checkpoints non-strictly: a file that does not fit the
    model (a backbone alone, another model) is evaluated as if it were
    trained, and shows as mAP 0. Here the file is read and loaded strictly
    into a model built from ``cfg.model``, with the ``module.`` prefix
    removed as MMEngine does.

    Args:
        cfg (Config): The run's config, ready for the Runner.
        path (str): The checkpoint (a local file).
        resume (bool): It must also hold the training state (``meta``
            with the epoch and iteration). Defaults to False.
        strict (bool): Whether the keys must fit; if not, only the file
            itself is checked. Defaults to True.

    Raises:
        OSError: If the file is missing or a folder.
        ValueError: If it is not a checkpoint, holds no state dict or, for
            ``resume``, no training state.
        KeyMismatchError: If ``strict`` and its keys or shapes do not fit
            ``cfg.model``; the message says what the file seems to hold.
    """
    if '://' in path:
        return  # remote files are MMEngine's business
    checkpoint = read_checkpoint(path)
    meta = checkpoint.get('meta')
    if resume and not (isinstance(meta, Mapping) and 'iter' in meta):
        raise ValueError(
            f'{path!r} holds no training state (no meta with the epoch and '
            'iteration); expected a checkpoint written by tools/train.py. '
            'To start a new run from its weights, use --cfg-options '
            f'load_from={path} instead of --resume.'
        )
    state_dict = state_dict_of(checkpoint, path)
    if not strict:
        return
    state_dict = {
        key.removeprefix('module.'): value for key, value in state_dict.items()
    }
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        model = MODELS.build(cfg.model)
    load_state_dict_strictly(model, state_dict, path)


def _plain(value):
    """Turns NumPy and torch scalars into plain Python numbers."""
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
        return value.item()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
