"""tools/train.py, tools/test.py and get_flops.py, run as a user runs them.

The training tests run the real command lines in subprocesses on a tiny
shapes dataset (64x64 images) with the demo's slim ACmix-R26 Mask R-CNN:

* two processes under torchrun (gloo on the CPU) end with identical
  weights, and tools/test.py evaluates their checkpoint with the COCO
  metric;
* a run killed with SIGKILL after a checkpoint and resumed with
  ``--resume`` ends with the same weights and logged the same losses as a
  run never stopped, and two runs of one seed log identical losses;
* an interrupted checkpoint save never leaves a broken ``last_checkpoint``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmacmix.apis.hooks import AtomicCheckpointHook, iteration_seed
from mmacmix.datasets import ShapesSpec, generate_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs' / 'demo' / 'mask-rcnn_acmix-r26_fpn_shapes.py'
SMALL = ShapesSpec(
    num_train=8, num_val=2, image_size=(64, 64), max_instances=3, seed=1
)

# The demo config at 64x64, batch 2, logging every iteration with no
# smoothing (so logs hold each iteration's exact loss), a checkpoint every
# 2 iterations and no validation during training.
SMALL_CONFIG = """
_base_ = {base!r}
data_root = {root!r}
size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=(
        'img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=2, dataset=dict(
    data_root=data_root + 'coco/', pipeline=train_pipeline))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = dict(batch_size=2, dataset=dict(
    data_root=data_root + 'coco/', pipeline=test_pipeline))
test_evaluator = dict(
    ann_file=data_root + 'coco/annotations/instances_val.json')
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2, max_keep_ckpts=1))
log_processor = dict(window_size=1)
model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0)))
"""


@pytest.fixture(scope='module')
def small_config(tmp_path_factory) -> str:
    """Writes the small config (4 iterations) over a fresh dataset."""
    folder = tmp_path_factory.mktemp('tools')
    root = generate_shapes_dataset(str(folder / 'shapes'), SMALL)
    path = folder / 'small.py'
    path.write_text(
        SMALL_CONFIG.format(base=str(DEMO_CONFIG), root=root + '/', iters=4)
    )
    return str(path)


def run_tool(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs a command with one thread per process (2 cores, shared)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    result = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, **kwargs
    )
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
    return result


def logged_losses(work_dir: Path) -> dict[int, dict[str, float]]:
    """Per-iteration losses of every run logged under ``work_dir``."""
    losses = {}
    for scalars in sorted(work_dir.glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                values = {k: v for k, v in record.items() if 'loss' in k}
                losses[record['iter']] = values
    return losses


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location='cpu', weights_only=False)[
        'state_dict'
    ]


# Trains as tools/train.py does (mmacmix.apis.train) under torchrun, then
# writes a digest of this rank's parameters, which only each process itself
# can see. (BN running statistics are buffers, which each rank keeps from
# its own data, as with MMEngine's default wrapper.)
RANK_DIGEST = """
import hashlib, os, sys
from mmacmix.apis import train
runner = train(sys.argv[1], work_dir=sys.argv[2], launcher='pytorch',
               cfg_options={'train_cfg.max_iters': 2})
digest = hashlib.sha256()
for key, value in sorted(runner.model.module.named_parameters()):
    digest.update(key.encode())
    digest.update(value.detach().contiguous().numpy().tobytes())
out = os.path.join(runner.work_dir, 'rank%s.sha256' % os.environ['RANK'])
with open(out, 'w') as file:
    file.write(digest.hexdigest())
"""


def test_torchrun_two_processes_agree_and_test_evaluates(
    small_config, tmp_path
):
    work_dir = tmp_path / 'dist'
    script = tmp_path / 'train_and_digest.py'
    script.write_text(RANK_DIGEST)
    run_tool(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            # A rendezvous on a free port torchrun picks itself: no race
            # with other processes for a port chosen beforehand.
            '--standalone',
            '--nproc_per_node=2',
            str(script),
            small_config,
            str(work_dir),
        ],
        timeout=300,
    )
    digests = [(work_dir / f'rank{r}.sha256').read_text() for r in (0, 1)]
    assert digests[0] == digests[1], 'the ranks ended with different weights'
    log = next(work_dir.glob('*/*.log')).read_text()
    assert 'Distributed launcher: pytorch' in log
    assert 'Distributed training: True' in log
    assert 'GPU number: 2' in log  # MMEngine's name for the world size

    checkpoint = work_dir / 'iter_2.pth'
    assert (work_dir / 'last_checkpoint').read_text() == str(checkpoint)
    metrics_file = tmp_path / 'new_folder' / 'metrics.json'  # created
    result = run_tool(
        [
            sys.executable,
            'tools/test.py',
            small_config,
            str(checkpoint),
            '--work-dir',
            str(tmp_path / 'test'),
            '--metrics-out',
            str(metrics_file),
        ],
        timeout=300,
    )
    printed = json.loads(result.stdout.split('metrics: ')[-1])
    assert printed == json.loads(metrics_file.read_text())
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert 0.0 <= printed[key] <= 1.0


def test_sigkill_and_resume_repeat_the_uninterrupted_run(
    small_config, tmp_path
):
    train = [sys.executable, 'tools/train.py', small_config, '--work-dir']
    straight = tmp_path / 'straight'
    run_tool(train + [str(straight)], timeout=300)

    # Killed the moment its first checkpoint is complete.
    stopped = tmp_path / 'stopped'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    process = subprocess.Popen(
        train + [str(stopped)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (stopped / 'last_checkpoint').exists():
        assert process.poll() is None, 'training ended before a checkpoint'
        assert time.monotonic() < deadline, 'no checkpoint in time'
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (stopped / 'iter_4.pth').exists(), 'killed too late'
    first_part = logged_losses(stopped)

    run_tool(train + [str(stopped), '--resume'], timeout=300)

    expected = weights(straight / 'iter_4.pth')
    resumed = weights(stopped / 'iter_4.pth')
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(value, resumed[key]), key

    straight_losses = logged_losses(straight)
    assert sorted(straight_losses) == list(range(1, 5))
    # Same seed, same losses: the killed run before it was killed...
    assert first_part, 'the killed run logged nothing'
    for step, values in first_part.items():
        assert values == straight_losses[step], step
    # ... and the resumed run after.
    assert logged_losses(stopped) == straight_losses


class _FakeRunner:
    """What CheckpointHook uses of a Runner, with a save that can die."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = str(work_dir)
        self.message_hub = SimpleNamespace(update_info=lambda *a: None)
        self.die = False

    def save_checkpoint(self, out_dir, filename, *args, **kwargs):
        with open(os.path.join(out_dir, filename), 'wb') as file:
            file.write(b'partial')
            if self.die:
                file.flush()
                raise SystemExit  # as if killed mid-write
            file.write(b' and complete')


def _atomic_hook(folder: Path, keep: list[int]) -> AtomicCheckpointHook:
    """The hook as before_train leaves it in a run resumed with ``keep``."""
    from mmengine.fileio import get_file_backend

    hook = AtomicCheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=1)
    hook.out_dir = str(folder)
    hook.file_backend = get_file_backend(str(folder))
    hook.keep_ckpt_ids = deque(keep, maxlen=1)
    return hook


def test_interrupted_save_keeps_last_checkpoint_valid(tmp_path, monkeypatch):
    runner = _FakeRunner(tmp_path)
    hook = _atomic_hook(tmp_path, [])
    hook._save_checkpoint_with_step(runner, 1, meta={})
    first = tmp_path / 'iter_1.pth'
    assert (tmp_path / 'last_checkpoint').read_text() == str(first)
    assert first.read_bytes() == b'partial and complete'

    # Killed while writing the next one: no cleanup code may run.
    runner.die = True
    monkeypatch.setattr(os.path, 'exists', lambda path: False)
    with pytest.raises(SystemExit):
        hook._save_checkpoint_with_step(runner, 2, meta={})
    monkeypatch.undo()
    # The previous checkpoint is still complete and still the latest
    # (MMEngine's hook deletes it before writing the new one); the new one
    # never appeared under its final name.
    assert (tmp_path / 'last_checkpoint').read_text() == str(first)
    assert first.read_bytes() == b'partial and complete'
    assert not (tmp_path / 'iter_2.pth').exists()
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith('.')]

    # Resumed from iter_1: the leftover goes, saving goes on as usual.
    hook = _atomic_hook(tmp_path, [1])
    hook.remove_partial_files()
    assert not leftover.exists()
    runner.die = False
    hook._save_checkpoint_with_step(runner, 3, meta={})
    last = tmp_path / 'iter_3.pth'
    assert (tmp_path / 'last_checkpoint').read_text() == str(last)
    assert not first.exists(), 'max_keep_ckpts=1 keeps only the newest'
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'iter_3.pth',
        'last_checkpoint',
    ]


def test_iteration_seeds_differ_for_every_seed_and_iteration():
    seeds = {iteration_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)


def test_amp_on_cpu_fails_clearly():
    from mmengine.config import Config

    from mmacmix.apis.runner import enable_amp

    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    if torch.cuda.is_available():
        enable_amp(cfg)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
        return
    with pytest.raises(ValueError, match='--amp needs a GPU'):
        enable_amp(cfg)


@pytest.mark.parametrize('form', ['as run', 'official form'])
def test_get_flops_counts_local_attention(form):
    extra = ['--official-form'] if form == 'official form' else []
    result = run_tool(
        [
            sys.executable,
            'tools/analysis/get_flops.py',
            '--backbone',
            'mmacmix.ACmixResNet',
            'depth=26',
            '--shape',
            '64',
            '64',
            '--by-operator',
            *extra,
        ],
        timeout=120,
    )
    assert f'multiply-adds, {form}' in result.stdout
    lines = dict(
        line.split(':', 1)
        for line in result.stdout.splitlines()
        if ':' in line
    )
    # 8_438_816 parameters: the official ACmix-ResNet-26 without its
    # classifier (see test_acmix_resnet.py's parameter count).
    assert lines['params'].strip() == '8.44 M'
    # The registered op is counted by its own handle.
    assert '  local_attention ' in result.stdout
    assert float(lines['FLOPs'].split()[0]) > 0
    # Counted by our handles, so not among the operators listed as missed.
    for operator in ('LocalAttention', 'SharedProjection', 'baddbmm'):
        assert operator not in result.stderr


@pytest.mark.parametrize(
    'script, args, expected',
    [
        (
            'dist_train.sh',
            ['cfg.py', '2', '--resume'],
            '-m torch.distributed.run --nnodes=3 --node_rank=1 '
            '--master_addr=10.0.0.1 --master_port=29999 --nproc_per_node=2 '
            '{tools}/train.py cfg.py --launcher pytorch --resume',
        ),
        (
            'dist_test.sh',
            ['cfg.py', 'ckpt.pth', '4'],
            '-m torch.distributed.run --nnodes=3 --node_rank=1 '
            '--master_addr=10.0.0.1 --master_port=29999 --nproc_per_node=4 '
            '{tools}/test.py cfg.py ckpt.pth --launcher pytorch',
        ),
        (
            'slurm_train.sh',
            ['part', 'job', 'cfg.py', 'work', '--amp'],
            'srun -p part --job-name=job --gres=gpu:2 --ntasks=4 '
            '--ntasks-per-node=2 --cpus-per-task=3 --kill-on-bad-exit=1 '
            '--quotatype=auto fake-python -u {tools}/train.py cfg.py '
            '--work-dir work --launcher slurm --amp',
        ),
        (
            'slurm_test.sh',
            ['part', 'job', 'cfg.py', 'ckpt.pth'],
            'srun -p part --job-name=job --gres=gpu:2 --ntasks=4 '
            '--ntasks-per-node=2 --cpus-per-task=3 --kill-on-bad-exit=1 '
            '--quotatype=auto fake-python -u {tools}/test.py cfg.py ckpt.pth '
            '--launcher slurm',
        ),
    ],
)
def test_launch_scripts_build_the_command(script, args, expected, tmp_path):
    # Stand-ins for python and srun that print what they were given.
    for name in ('srun', 'fake-python'):
        stub = tmp_path / name
        stub.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        stub.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f'{tmp_path}:{os.environ["PATH"]}',
        NNODES='3',
        NODE_RANK='1',
        MASTER_ADDR='10.0.0.1',
        PORT='29999',
        GPUS='4',
        GPUS_PER_NODE='2',
        CPUS_PER_TASK='3',
        SRUN_ARGS='--quotatype=auto',
        PYTHON='fake-python',
    )
    # The launchers check that the config and checkpoint exist.
    (tmp_path / 'cfg.py').touch()
    (tmp_path / 'ckpt.pth').touch()
    result = subprocess.run(
        ['bash', str(REPO / 'tools' / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    prefix = 'fake-python ' if script.startswith('dist') else ''
    tools = REPO / 'tools'
    assert result.stdout.strip() == prefix + expected.format(tools=tools)


def test_flop_handles_count_attention_multiply_adds():
    from mmacmix.analysis import analyse
    from mmacmix.ops import local_attention

    class Local(torch.nn.Module):
        attn_kernel_size = 3

        def forward(self, x):
            q = x[..., ::2, ::2].contiguous()
            return local_attention(q, x, x, 3, stride=2)

    class Fused(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    x = torch.randn(2, 4, 6, 10)
    # Each of 2 * 3 * 5 output pixels: 9 dot products and a 9-term sum of
    # 4-vectors.
    counted = analyse(Local(), (x,))
    assert counted['flops'] == 2 * 2 * 4 * 3 * 5 * 9
    assert not counted['uncounted']
    q, k, v = (
        torch.randn(2, 3, 5, 8),
        torch.randn(2, 3, 7, 8),
        torch.randn(2, 3, 7, 6),
    )
    counted = analyse(Fused(), (q, k, v))
    assert counted['flops'] == 2 * 3 * 5 * 7 * (8 + 6)
