"""The demo command (python -m mmacmix.demo) end to end, in its tiny mode:
data generation, training, COCO evaluation, metrics, loss plot, drawings."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2

from mmacmix.demo.pipeline import _replace_prefix, _rescale_schedule

REPO = Path(__file__).resolve().parents[2]


def test_tiny_demo_writes_metrics_and_pictures(tmp_path):
    out_dir = tmp_path / 'out'
    data_root = tmp_path / 'shapes'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'mmacmix.demo',
            '--tiny',
            '--out-dir',
            str(out_dir),
            '--data-root',
            str(data_root),
        ],
        cwd=tmp_path,  # the demo must not depend on the working folder
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    # The console shows the steps, the progress bar and the result only;
    # what pycocotools prints goes to the log file.
    steps = ('[1/4] ', '[2/4] ', '  [#', '[3/4] ', '[4/4] ', 'bbox mAP ')
    infer = 'Run it on an image: '
    lines = result.stdout.splitlines()
    assert [line for line in lines if not line.startswith(steps)] == [
        lines[-1]
    ]
    assert lines[-2].startswith('bbox mAP ')
    # The last line is a command that runs the trained detector.
    assert lines[-1].startswith(infer)
    command = shlex.split(lines[-1][len(infer) :])
    train = out_dir / 'train'
    assert command == [
        'python',
        str(REPO / 'tools' / 'infer.py'),
        str(train / 'mask-rcnn_acmix-r26_fpn_shapes.py'),
        str(train / 'iter_2.pth'),
        str(data_root / 'coco' / 'val' / '000000.jpg'),
        '--out-dir',
        str(out_dir / 'infer'),
    ]
    ran = subprocess.run(
        [sys.executable, *command[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr
    written = json.loads((out_dir / 'infer/preds/000000.json').read_text())
    assert len(written['bboxes']) == len(written['scores'])
    assert (out_dir / 'infer/vis/000000.jpg').is_file()
    assert result.stderr == ''
    [log] = (out_dir / 'train').glob('*/*.log')
    assert 'loading annotations into memory...' in log.read_text()
    assert (data_root / 'coco' / 'annotations' / 'instances_val.json').exists()
    assert (data_root / 'ade' / 'annotations' / 'validation').is_dir()

    metrics = json.loads((out_dir / 'metrics.json').read_text())
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert isinstance(metrics[key], float)
        assert -1.0 <= metrics[key] <= 1.0
    assert metrics['iterations'] == 2
    assert metrics['wall_seconds'] > 0
    assert metrics['threads'] == 1  # OMP_NUM_THREADS above
    assert isinstance(metrics['cpu'], str) and metrics['cpu']

    curve = cv2.imread(str(out_dir / 'loss_curve.png'))
    assert curve is not None and curve.shape[0] > 100
    drawings = sorted((out_dir / 'predictions').glob('*.png'))
    assert len(drawings) == 4
    for path in drawings:
        image = cv2.imread(str(path))
        # Ground truth and prediction side by side, 3x enlarged.
        assert image.shape == (3 * 128, 2 * 3 * 128, 3)
    assert (out_dir / 'train' / 'iter_2.pth').exists()


def test_data_root_prefix_is_moved_everywhere():
    cfg = dict(
        a=dict(data_root='data/shapes/coco/', other='data/elsewhere/'),
        b=[dict(ann_file='data/shapes/coco/annotations/x.json')],
    )
    _replace_prefix(cfg, 'data/shapes/', '/tmp/s/')
    assert cfg == dict(
        a=dict(data_root='/tmp/s/coco/', other='data/elsewhere/'),
        b=[dict(ann_file='/tmp/s/coco/annotations/x.json')],
    )


def test_schedule_is_stretched_to_the_new_length():
    from mmengine.config import Config

    cfg = Config(
        dict(
            train_cfg=dict(max_iters=900),
            param_scheduler=[
                dict(type='LinearLR', begin=0, end=50),
                dict(type='CosineAnnealingLR', begin=50, end=900),
            ],
        )
    )
    _rescale_schedule(cfg, 90)
    assert cfg.train_cfg.max_iters == 90
    assert [(s.begin, s.end) for s in cfg.param_scheduler] == [
        (0, 5),
        (5, 90),
    ]
    _rescale_schedule(cfg, 2)
    for scheduler in cfg.param_scheduler:
        assert 0 <= scheduler.begin < scheduler.end <= 2
