"""Runner hooks that make training restartable: atomic checkpoints and
exactly reproducible resumption.

MMEngine's ``CheckpointHook`` deletes the oldest checkpoint before writing
the new one, writes the new file in place, then points ``last_checkpoint``
at it; a run killed while saving can leave ``last_checkpoint`` naming a
deleted or truncated file, and ``--resume`` then fails. A resumed run is
also not the run it continues: the torch random state (RoI sampling,
dropout, drop-path) restarts from the seed. The two hooks here close both
gaps. A third, :class:`FlushDenormalHook`, keeps randomly initialised
detectors fast on a CPU.

:func:`add_project_hooks` names all three in a config; ``tools/train.py``
and ``tools/test.py`` call it explicitly before the Runner is built, so the
config the Runner saves beside the checkpoints says what ran. Other
launchers (``mim train``) get them from a config that names them
(``type='mmacmix.ExactResumeHook'``).
"""

import os
import os.path as osp
import random

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.runner import EpochBasedTrainLoop

from mmacmix.fileio import PARTIAL_SUFFIX, atomic_path, fsync, fsync_folder
from mmacmix.registry import HOOKS


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose saves can be interrupted at any moment.

    Same arguments and file names as ``CheckpointHook``. For a local
    ``out_dir`` each checkpoint is written under a temporary name in the
    same folder, flushed to disk and renamed into place; ``last_checkpoint``
    is replaced the same way, and checkpoints beyond ``max_keep_ckpts`` are
    deleted only after the new one is complete. Whatever moment a run is
    killed, ``last_checkpoint`` names a complete checkpoint (or does not
    exist yet); the partial file of a killed save is removed when training
    starts again. Remote back ends (``backend_args``) keep MMEngine's
    behaviour.
    """

    def before_train(self, runner) -> None:
        super().before_train(runner)
        if isinstance(self.file_backend, LocalBackend) and is_main_process():
            self.remove_partial_files(runner.work_dir)

    def remove_partial_files(self, work_dir: str | None = None) -> None:
        """Deletes what saves cut short by a killed run left behind (in
        ``out_dir`` and, for ``last_checkpoint``, ``work_dir``)."""
        for folder in {self.out_dir, work_dir or self.out_dir}:
            if not osp.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.startswith('.') and name.endswith(PARTIAL_SUFFIX):
                    os.remove(osp.join(folder, name))

    def _save_checkpoint_with_step(self, runner, step: int, meta: dict):
        if not isinstance(self.file_backend, LocalBackend):
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        # Bookkeeping first, as MMEngine does, so that the saved message hub
        # already lists this checkpoint among those to keep.
        stale = []
        if self.max_keep_ckpts > 0 and not (
            self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step
        ):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info(
                'keep_ckpt_ids', list(self.keep_ckpt_ids)
            )
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = osp.join(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        # Runner.save_checkpoint writes on the main process only.
        partial = f'.{filename}.{os.getpid()}{PARTIAL_SUFFIX}'
        partial_path = osp.join(self.out_dir, partial)
        try:
            runner.save_checkpoint(
                self.out_dir,
                partial,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args,
            )
            if not is_main_process():
                return
            fsync(partial_path)
            os.replace(partial_path, self.last_ckpt)
        except BaseException:
            if osp.exists(partial_path):
                os.remove(partial_path)
            raise
        fsync_folder(self.out_dir)
        last = osp.join(runner.work_dir, 'last_checkpoint')
        with atomic_path(last) as temporary, open(temporary, 'w') as file:
            file.write(self.last_ckpt)
        for old in stale:
            path = osp.join(self.out_dir, self.filename_tmpl.format(old))
            if osp.isfile(path):
                os.remove(path)


@HOOKS.register_module()
class ExactResumeHook(Hook):
    """Makes a resumed run repeat the uninterrupted run bit for bit.

    Two sources of randomness matter when a run is resumed from a
    checkpoint:

    * The model side (RoI sampling, dropout, drop-path) draws from torch's
      global generator. Before every training iteration this hook reseeds
      it from ``(runner.seed, runner.iter)``, so iteration ``i`` draws the
      same numbers whether or not the run was restarted before it, and
      whatever ran in between (validation, a new data-loader iterator)
      cannot shift them.
    * The data side (random flips and crops) draws from NumPy's and
      Python's generators while batches are loaded. An iteration-based
      loop replays the batches it already trained on when it resumes,
      which repeats those draws exactly; an epoch-based loop starts a fresh
      epoch, so the generators' states are saved with each checkpoint and
      restored when it is loaded.

    With ``randomness=dict(seed=..., deterministic=True)`` and
    ``num_workers=0`` a run killed and resumed ends with the same weights
    and losses as one that was never stopped. Data-loader workers keep
    their own generators (seeded per worker by MMEngine); transforms that
    draw from torch's generator while loading are not covered.
    """

    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx: int, data_batch=None):
        seed = iteration_seed(runner.seed, runner.iter)
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault('meta', {})['host_rng_state'] = dict(
            numpy=np.random.get_state(), python=random.getstate()
        )

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get('meta', {}).get('host_rng_state')
        loop = getattr(runner, '_train_loop', None)
        # Only an epoch-based loop needs them: an iteration-based one
        # regenerates the states by replaying the data it skips.
        if state is not None and isinstance(loop, EpochBasedTrainLoop):
            np.random.set_state(state['numpy'])
            random.setstate(state['python'])


def iteration_seed(seed: int, iteration: int) -> int:
    """Derives the torch seed of one training iteration.

    Args:
        seed (int): The run's seed (``runner.seed``).
        iteration (int): The 0-based training iteration.

    Returns:
        int: A 63-bit seed, a pure function of both arguments.
    """
    sequence = np.random.SeedSequence([seed % 2**32, iteration])
    return int(sequence.generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


@HOOKS.register_module()
class FlushDenormalHook(Hook):
    """Flushes denormal floats to zero while the run lasts.

    Randomly initialised detectors produce denormal floats, which make some
    CPU steps many times slower; flushing them changes no result. The
    setting is process-wide in torch, so it is switched on in
    ``before_run`` and back to what it was in ``after_run``.
    """

    priority = 'VERY_HIGH'

    def before_run(self, runner) -> None:
        self._was_flushing = flushing_denormals()
        torch.set_flush_denormal(True)

    def after_run(self, runner) -> None:
        torch.set_flush_denormal(getattr(self, '_was_flushing', False))


def flushing_denormals() -> bool:
    """Whether torch flushes denormal floats to zero now (torch has no
    getter: a denormal input reads as zero when it does)."""
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    return bool((tiny * 2).item() == 0.0)


def add_project_hooks(cfg: Config) -> Config:
    """Names this project's hooks in ``cfg``, for a Runner built from it.

    * ``default_hooks.checkpoint`` of type ``CheckpointHook`` becomes an
      :class:`AtomicCheckpointHook` with the same arguments;
    * :class:`ExactResumeHook` and :class:`FlushDenormalHook` join
      ``custom_hooks``, unless the config names them already.

    ``tools/train.py`` and ``tools/test.py`` (:func:`mmacmix.apis.train`,
    :func:`mmacmix.apis.test`) call it; :func:`mmacmix.apis.build_runner`
    does not, so a Runner built from a config runs the hooks that config
    names and no others.

    Args:
        cfg (Config): The run's config; changed in place.

    Returns:
        Config: ``cfg``.
    """
    checkpoint = (cfg.get('default_hooks') or {}).get('checkpoint')
    if checkpoint is not None and checkpoint.get('type') in (
        'CheckpointHook',
        'mmengine.CheckpointHook',
        CheckpointHook,
    ):
        checkpoint['type'] = 'mmacmix.AtomicCheckpointHook'
    hooks = list(cfg.get('custom_hooks') or [])
    named = {
        getattr(kind, '__name__', str(kind)).rpartition('.')[2]
        for kind in (hook.get('type') for hook in hooks)
    }
    for hook in (ExactResumeHook, FlushDenormalHook):
        if hook.__name__ not in named:
            hooks.append(dict(type=f'mmacmix.{hook.__name__}'))
    cfg.custom_hooks = hooks
    return cfg
