"""Starting distributed runs where MMEngine's launchers assume a GPU.

MMEngine 0.10.7 initialises a ``pytorch`` or ``slurm`` launch by calling
``torch.cuda.set_device`` first, which fails on a CPU-only torch, and wraps
the model in DDP with ``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU
modules. :func:`setup_distributed` initialises the process group itself
(gloo) on such machines before the Runner is built (the Runner then skips
its own initialisation) and adjusts the config; on GPU machines it changes
nothing and MMEngine proceeds as usual.
"""

import os
import subprocess

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.logging import print_log

LAUNCHERS = ('none', 'pytorch', 'slurm')


def setup_distributed(cfg: Config, launcher: str) -> None:
    """Prepares ``cfg`` (and the process group) for ``launcher``.

    Args:
        cfg (Config): The run's config; ``cfg.launcher`` is set, and on a
            CPU-only machine ``model_wrapper_cfg``, ``env_cfg.dist_cfg`` and
            any SyncBN layer are adapted.
        launcher (str): ``'none'``, ``'pytorch'`` (torchrun) or ``'slurm'``
            (srun).

    Raises:
        ValueError: If ``launcher`` is unknown, or the environment lacks
            the variables its starter (torchrun, srun) sets.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(
            f'launcher must be one of {LAUNCHERS}, got {launcher}'
        )
    check_launch_environment(launcher)
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    cfg.env_cfg.dist_cfg.backend = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or {}
    wrapper = dict(wrapper)
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    # What MMEngine passes when it builds the wrapper itself.
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault(
        'find_unused_parameters', cfg.get('find_unused_parameters', False)
    )
    # DDP rejects device_ids for CPU modules; None means "where it is".
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    if replace_sync_bn(cfg.model):
        print_log(
            'SyncBN cannot run on CPU: it is replaced by BN, so each process '
            'normalises its own batch.',
            logger='current',
        )
    if not torch_dist.is_initialized():
        init_cpu_process_group(launcher)


# What torchrun and srun set for every process they start.
LAUNCH_VARIABLES = {
    'pytorch': ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'),
    'slurm': ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'),
}
STARTERS = {
    'pytorch': 'tools/dist_train.sh or tools/dist_test.sh (torchrun)',
    'slurm': 'tools/slurm_train.sh or tools/slurm_test.sh (srun)',
}


def check_launch_environment(launcher: str) -> None:
    """Checks that this process was started by the launcher's starter.

    Raises:
        ValueError: If variables that torchrun (``pytorch``) or srun
            (``slurm``) set are missing, naming them.
    """
    missing = [
        name
        for name in LAUNCH_VARIABLES.get(launcher, ())
        if name not in os.environ
    ]
    if missing:
        raise ValueError(
            f'--launcher {launcher} found no {", ".join(missing)} in the '
            f'environment; expected a process started by {STARTERS[launcher]}'
            '. Run without --launcher for a single process.'
        )


def init_cpu_process_group(launcher: str) -> None:
    """Initialises a gloo process group from the launcher's environment.

    ``pytorch`` reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` as torchrun sets them. ``slurm`` derives them from
    ``SLURM_PROCID``, ``SLURM_NTASKS`` and the first host of
    ``SLURM_NODELIST`` (port ``MASTER_PORT`` or 29500), as MMEngine does.

    Args:
        launcher (str): ``'pytorch'`` or ``'slurm'``.
    """
    if launcher == 'slurm':
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ.setdefault(
            'LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0')
        )
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            nodes = os.environ['SLURM_NODELIST']
            hosts = subprocess.run(
                ['scontrol', 'show', 'hostnames', nodes],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            os.environ['MASTER_ADDR'] = hosts[0]
    torch_dist.init_process_group(
        backend='gloo',
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
    )


def replace_sync_bn(node) -> bool:
    """Turns every ``SyncBN`` norm config under ``node`` into ``BN``.

    Returns:
        bool: Whether anything was replaced.
    """
    found = False
    if isinstance(node, dict):
        if node.get('type') == 'SyncBN':
            node['type'] = 'BN'
            found = True
        for value in node.values():
            found |= replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            found |= replace_sync_bn(value)
    return found
