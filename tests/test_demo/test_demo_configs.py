"""The demo with --config: a segmentation config runs to the end, a
config it cannot run is refused before any work, and a run that fails
leaves the output folder as it was."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmacmix.demo import pipeline
from mmacmix.demo.__main__ import main as demo_main

REPO = Path(__file__).resolve().parents[2]
UPERNET = REPO / 'configs/demo/acmix-r26_upernet_shapes.py'
CLASSIFIER = REPO / 'configs/demo/acmix-r26_shapes-cls.py'
COCO = REPO / 'configs/acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py'
MASK_RCNN = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


def test_tiny_segmentation_demo_reports_miou_and_draws_classes(tmp_path):
    out_dir, data_root = tmp_path / 'out', tmp_path / 'shapes'
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'mmacmix.demo',
            '--tiny',
            '--config',
            str(UPERNET),
            '--out-dir',
            str(out_dir),
            '--data-root',
            str(data_root),
        ],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS='1'),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    lines = result.stdout.splitlines()
    steps = (
        '[1/4] ',
        '[2/4] training ACmix UperNet ',
        '  [#',
        '[3/4] mIoU evaluation ',
        '[4/4] ',
        'mIoU ',
        'Run it on an image: ',
    )
    assert [line for line in lines if not line.startswith(steps)] == []
    assert lines[-2].startswith('mIoU ')
    assert ', aAcc ' in lines[-2] and '(4 val images)' in lines[-2]
    assert lines[-1].startswith('Run it on an image: ')
    # Third-party deprecation warnings are kept off the console, in the log.
    assert result.stderr == ''
    [log] = (out_dir / 'train').glob('*/*.log')
    assert 'pkg_resources is deprecated' in log.read_text()

    metrics = json.loads((out_dir / 'metrics.json').read_text())
    for key in ('mIoU', 'aAcc', 'mAcc'):
        assert 0.0 <= metrics[key] <= 100.0  # percent, as mmseg reports
    assert metrics['iterations'] == 2
    assert lines[-2].startswith(f'mIoU {metrics["mIoU"]:.1f} %, ')

    drawings = sorted((out_dir / 'predictions').glob('*.png'))
    assert len(drawings) == 4
    for path in drawings:
        drawing = cv2.imread(str(path))
        # Ground truth and prediction side by side, 3x enlarged.
        assert drawing.shape == (3 * 128, 2 * 3 * 128, 3)
        # The left half is the image with each pixel blended with its
        # class's palette colour (mmseg's alpha 0.8), but where the class
        # names are written.
        expected = ground_truth_drawing(data_root, path.stem)
        close = np.abs(drawing[:, :384].astype(int) - expected) <= 2
        assert close.all(axis=-1).mean() > 0.9
    assert (out_dir / 'train' / 'iter_2.pth').is_file()
    assert (out_dir / 'loss_curve.png').is_file()
    # Nothing half-made is left beside the results.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []
    assert [p.name for p in out_dir.iterdir() if p.name.startswith('.')] == []


def ground_truth_drawing(data_root: Path, name: str) -> np.ndarray:
    """The 3x enlarged validation image blended with its classes' colours
    (BGR), computed from the dataset and the config's palette."""
    from mmengine.config import Config

    palette = np.array(Config.fromfile(str(UPERNET)).palette, np.float64)
    image = cv2.imread(str(data_root / f'ade/images/validation/{name}.jpg'))
    labels = cv2.imread(
        str(data_root / f'ade/annotations/validation/{name}.png'),
        cv2.IMREAD_UNCHANGED,
    )
    image = image.repeat(3, 0).repeat(3, 1)[..., ::-1].astype(np.float64)
    labels = labels.repeat(3, 0).repeat(3, 1)
    blended = (image * 0.2 + palette[labels] * 0.8).astype(np.uint8)
    return blended[..., ::-1].astype(int)


@pytest.mark.parametrize(
    'config, message',
    [
        (
            CLASSIFIER,
            f"error: --config '{CLASSIFIER}' is a mmpretrain config; the "
            'demo trains mmdet (detection) and mmseg (segmentation) configs '
            'on the shapes; the demo pretrains this classifier with '
            '--pretrain',
        ),
        (
            COCO,
            f"error: --config '{COCO}' reads 'data/coco/' (train_dataloader),"
            ' not the shapes dataset (data/shapes/...); the demo trains '
            'configs on the shapes, as those in configs/demo/ do. Train '
            'others with tools/train.py',
        ),
    ],
)
def test_configs_the_demo_cannot_run_are_refused_before_any_work(
    config, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        demo_main(['--tiny', '--config', str(config)])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == message + '\n'
    # No dataset generated, no output folder.
    assert listing(tmp_path) == []


def test_following_the_classifier_hint_gets_past_the_refusal(
    tmp_path, monkeypatch
):
    """--pretrain (without --config) is accepted and starts its work."""
    from mmacmix.demo import comparison

    monkeypatch.chdir(tmp_path)

    def stop(root, spec):
        raise KeyboardInterrupt  # reached the first step of the work

    monkeypatch.setattr(comparison, 'generate_shapes_dataset', stop)
    with pytest.raises(KeyboardInterrupt):
        demo_main(['--tiny', '--pretrain'])
    assert listing(tmp_path) == []


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory) -> str:
    """The dataset of the demo's --tiny runs."""
    from mmacmix.datasets import generate_shapes_dataset

    root = tmp_path_factory.mktemp('tiny') / 'shapes'
    return generate_shapes_dataset(str(root), pipeline.TINY_SHAPES)


def run_failing_demo(monkeypatch, out_dir, data_root, error) -> None:
    """Runs the tiny demo; its training writes into its work folder, then
    raises ``error``."""

    def train(cfg, progress=True, val_message=None):
        os.makedirs(os.path.join(cfg.work_dir, '20260101_000000'))
        Path(cfg.work_dir, 'iter_1.pth').write_bytes(b'half')
        raise error

    monkeypatch.setattr(pipeline, 'train_quietly', train)
    with pytest.raises(type(error)):
        pipeline.run_demo(
            out_dir=str(out_dir),
            data_root=data_root,
            config=str(MASK_RCNN),
            tiny=True,
            progress=False,
        )


@pytest.mark.parametrize('error', [RuntimeError('boom'), KeyboardInterrupt()])
def test_a_failed_run_leaves_no_output_folder(
    error, tiny_root, tmp_path, monkeypatch
):
    run_failing_demo(monkeypatch, tmp_path / 'new' / 'out', tiny_root, error)
    assert listing(tmp_path) == []


def test_a_failed_run_keeps_the_previous_results(
    tiny_root, tmp_path, monkeypatch
):
    out_dir = tmp_path / 'out'
    (out_dir / 'train').mkdir(parents=True)
    (out_dir / 'train' / 'iter_2.pth').write_bytes(b'previous run')
    (out_dir / 'metrics.json').write_text('{"coco/bbox_mAP": 0.5}')
    before = {p: p.read_bytes() for p in out_dir.rglob('*') if p.is_file()}
    run_failing_demo(monkeypatch, out_dir, tiny_root, RuntimeError('boom'))
    after = {p: p.read_bytes() for p in out_dir.rglob('*') if p.is_file()}
    assert after == before
    assert listing(out_dir) == ['metrics.json', 'train', 'train/iter_2.pth']


def test_pictures_replace_the_old_ones_only_when_all_are_drawn(tmp_path):
    folder = tmp_path / 'predictions'
    folder.mkdir()
    (folder / 'old.png').write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with pipeline.replaced_folder(str(folder)) as partial:
            Path(partial, 'new.png').write_bytes(b'new')
            raise RuntimeError('drawing failed')
    assert listing(tmp_path) == ['predictions', 'predictions/old.png']
    with pipeline.replaced_folder(str(folder)) as partial:
        Path(partial, 'new.png').write_bytes(b'new')
    assert listing(tmp_path) == ['predictions', 'predictions/new.png']


def test_following_the_train_py_hint_gets_past_the_refusal(
    tmp_path, monkeypatch
):
    """tools/train.py reads the COCO config and goes on to build its
    Runner (where a stand-in stops it)."""
    import runpy

    from mmacmix.apis import runner

    class Reached(Exception):
        pass

    def stop(cfg, *args, **kwargs):
        raise Reached(cfg.train_dataloader.dataset.data_root)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, 'build_runner', stop)
    train = runpy.run_path(str(REPO / 'tools' / 'train.py'))['main']
    with pytest.raises(Reached, match='data/coco/'):
        train([str(COCO), '--work-dir', 'work'])
    assert listing(tmp_path) == []
