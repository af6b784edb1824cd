"""tools/infer.py, run as a user runs it, against tools/test.py.

The demo's ACmix-R26 Mask R-CNN and UperNet configs are trained for one
iteration with tools/train.py on two 64x64 shapes images. tools/test.py
dumps its predictions on the validation images (mmdet's
``DumpDetResults``, MMEngine's ``DumpResults``); tools/infer.py, on the
same images, must write the same boxes, scores, labels and masks
(detection) and the same class map (segmentation). Bad arguments end with
one line on stderr, exit status 1 and nothing written.

The tools run in this process (tests/cli_helpers.py), but for one case
that needs the console of a process of its own.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_helpers import error_line, listing, run, tool
from PIL import Image

from mmacmix.apis.inference import (
    _write_picture,
    collect_images,
    infer_command,
)
from mmacmix.datasets import ShapesSpec, generate_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools'
DEMO = REPO / 'configs' / 'demo'
SPEC = ShapesSpec(
    num_train=2, num_val=2, image_size=(64, 64), max_instances=2, seed=3
)

# The demo detector at 64x64, one training iteration, no validation; the
# test split is the validation images, one per batch, with every box kept
# (score_thr 0: a model trained one step scores low) and dumped.
DETECTOR = """
_base_ = {base!r}
data_root = {root!r}
size = (64, 64)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=size, keep_ratio=True),
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
test_dataloader = dict(batch_size=1, dataset=dict(
    data_root=data_root + 'coco/', pipeline=test_pipeline))
test_evaluator = dict(
    _delete_=True, type='DumpDetResults', out_file_path={dump!r})
train_cfg = dict(max_iters=1, val_interval=1)
default_hooks = dict(checkpoint=dict(interval=1))
model = dict(test_cfg=dict(rcnn=dict(score_thr=0.0)))
"""

# The demo UperNet on the same images (their ADE20K layout), likewise.
SEGMENTOR = """
_base_ = {base!r}
data_root = {root!r}
model = dict(data_preprocessor=dict(size=(64, 64)))
train_dataloader = dict(
    batch_size=2, dataset=dict(data_root=data_root + 'ade'))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = dict(dataset=dict(data_root=data_root + 'ade'))
test_evaluator = dict(
    _delete_=True, type='DumpResults', out_file_path={dump!r})
train_cfg = dict(max_iters=1, val_interval=1)
default_hooks = dict(checkpoint=dict(interval=1))
"""


def trained(folder: Path, template: str, base: str) -> dict[str, Path]:
    """Writes a config, trains it one iteration and dumps its test
    predictions with tools/test.py."""
    root = generate_shapes_dataset(str(folder / 'shapes'), SPEC)
    config = folder / 'config.py'
    dump = folder / 'test.pkl'
    config.write_text(
        template.format(base=str(DEMO / base), root=root + '/', dump=str(dump))
    )
    work = folder / 'work'
    tool('train.py')([str(config), '--work-dir', str(work)])
    checkpoint = work / 'iter_1.pth'
    tool('test.py')([str(config), str(checkpoint), '--work-dir', str(work)])
    with open(dump, 'rb') as file:
        dumped = pickle.load(file)
    return dict(
        config=config, checkpoint=checkpoint, root=Path(root), dump=dumped
    )


@pytest.fixture(scope='module')
def detector(tmp_path_factory) -> dict:
    return trained(
        tmp_path_factory.mktemp('det'),
        DETECTOR,
        'mask-rcnn_acmix-r26_fpn_shapes.py',
    )


@pytest.fixture(scope='module')
def segmentor(tmp_path_factory) -> dict:
    return trained(
        tmp_path_factory.mktemp('seg'),
        SEGMENTOR,
        'acmix-r26_upernet_shapes.py',
    )


def test_detections_equal_what_test_py_computes(detector, tmp_path, capsys):
    images = detector['root'] / 'coco' / 'val'
    out = tmp_path / 'out'
    args = [detector['config'], detector['checkpoint'], images]
    args += ['--out-dir', out, '--device', 'cpu', '--score-thr', '0.1']
    tool('infer.py')([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == (
        f'detection of 2 images: predictions in {out}/preds, pictures in '
        f'{out}/vis'
    )
    assert 'Inference' in captured.err  # the progress bar of a folder
    assert sorted(p.name for p in out.iterdir()) == ['preds', 'vis']
    assert len(detector['dump']) == 2
    for sample in detector['dump']:
        name = Path(sample['img_path']).stem
        written = json.loads((out / 'preds' / f'{name}.json').read_text())
        expected = sample['pred_instances']
        assert len(written['labels']) == len(expected['labels']) > 0
        assert written['labels'] == expected['labels'].tolist()
        np.testing.assert_allclose(
            written['scores'], expected['scores'].numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(
            written['bboxes'], expected['bboxes'].numpy(), atol=1e-4
        )
        assert written['masks'] == [
            dict(size=list(mask['size']), counts=mask['counts'].decode())
            for mask in expected['masks']
        ]
        drawn = np.asarray(Image.open(out / 'vis' / f'{name}.jpg'))
        assert drawn.shape == (64, 64, 3)


def test_segmentation_equals_what_test_py_computes(
    segmentor, tmp_path, capsys
):
    images = sorted(
        (segmentor['root'] / 'ade' / 'images' / 'validation').glob('*.jpg')
    )
    out = tmp_path / 'out'
    args = [segmentor['config'], segmentor['checkpoint'], *images]
    code, err = run(tool('infer.py'), [*args, '--out-dir', out], capsys)
    assert code == 0, err
    assert len(segmentor['dump']) == 2
    for sample in segmentor['dump']:
        name = Path(sample['img_path']).stem
        written = np.asarray(Image.open(out / 'preds' / f'{name}.png'))
        expected = sample['pred_sem_seg']['data'][0].numpy()
        assert written.shape == expected.shape == (64, 64)
        np.testing.assert_array_equal(written, expected)
        drawn = np.asarray(Image.open(out / 'vis' / f'{name}.jpg'))
        assert drawn.shape == (64, 64, 3)


def test_infer_command_names_the_tool_and_quotes(tmp_path):
    command = infer_command('a b.py', 'c.pth', 'd.jpg', 'out dir')
    assert command == (
        "python tools/infer.py 'a b.py' c.pth d.jpg --out-dir 'out dir'"
    )


def test_inputs_are_listed_once_in_order(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    for name in ('b.png', 'a.jpg', 'notes.txt'):
        Image.fromarray(image).save(tmp_path / name, format='PNG')
    folder = str(tmp_path)
    assert collect_images([folder, f'{folder}/a.jpg']) == [
        f'{folder}/a.jpg',
        f'{folder}/b.png',
    ]


def test_drawings_keep_the_input_format_and_colours(tmp_path):
    picture = np.zeros((4, 6, 3), np.uint8)
    picture[..., 0] = 255  # red, in the RGB order of the visualizers
    for name, written in (
        ('a.jpg', 'a.jpg'),
        ('b.pgm', 'b.png'),  # PGM holds grey only
        ('c.PNG', 'c.PNG'),
    ):
        path = _write_picture(picture, str(tmp_path), f'/in/{name}')
        assert path == str(tmp_path / 'vis' / written)
        blue, green, red = cv2.imread(path)[0, 0]
        assert red > 200 and blue < 50 and green < 50
    assert sorted(os.listdir(tmp_path / 'vis')) == ['a.jpg', 'b.png', 'c.PNG']


class Pickled:
    """A pickle that writes a file when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, 'ran'))


def bad_cases(detector, segmentor, folder: Path) -> list[tuple]:
    """(arguments, the expected error line) of each bad call."""
    config, checkpoint = detector['config'], detector['checkpoint']
    image = detector['root'] / 'coco' / 'val' / '000000.jpg'
    empty = folder / 'empty'
    empty.mkdir(parents=True)
    (empty / 'notes.txt').write_text('no image')
    twin = folder / 'twin'
    twin.mkdir()
    (twin / '000000.png').write_bytes(image.read_bytes())
    fake = folder / 'fake.jpg'
    fake.write_text('not an image')
    evil = folder / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': Pickled(folder / 'ran')}, evil)
    suffixes = '.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp'
    seg_checkpoint = segmentor['checkpoint']
    cases = [
        (
            [config, checkpoint, folder / 'missing.jpg'],
            f"input '{folder}/missing.jpg' does not exist; expected an "
            'image file or a folder of images',
        ),
        (
            [config, checkpoint, empty],
            f"input folder '{empty}' holds no images; expected files "
            f'ending in {suffixes}',
        ),
        (
            [config, checkpoint, empty / 'notes.txt'],
            f"input '{empty}/notes.txt' is not an image file; expected a "
            f'name ending in {suffixes}, or a folder',
        ),
        (
            [config, checkpoint, fake],
            f"input '{fake}' is not a readable image (its content is in no "
            'format OpenCV decodes); expected a JPEG, PNG, ... file',
        ),
        (
            [config, checkpoint, image, twin],
            f"inputs '{image}' and '{twin}/000000.png' would write the same "
            'output files (preds/000000.*); run them separately, each with '
            'its own --out-dir',
        ),
        (
            [config, seg_checkpoint, image],
            f"'{seg_checkpoint}' does not fit MaskRCNN: ",
        ),
        (
            [config, evil, image],
            f"'{evil}' was not loaded: unpickling it needs ",
        ),
        (
            [config, folder / 'missing.pth', image],
            f"checkpoint '{folder}/missing.pth' does not exist",
        ),
        (
            [segmentor['config'], seg_checkpoint, image, '--score-thr', '0.5'],
            '--score-thr applies to detection configs only; '
            f"'{segmentor['config']}' is a segmentation config",
        ),
        (
            [config, checkpoint, image, '--device', 'gpu'],
            "--device 'gpu' is not a device; expected 'cpu', 'cuda' or "
            "'cuda:N'",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (
                [config, checkpoint, image, '--device', 'cuda'],
                "--device 'cuda': this machine has no CUDA devices; use "
                '--device cpu',
            )
        )
    return cases


def test_bad_arguments_fail_in_one_line_and_write_nothing(
    detector, segmentor, tmp_path, capsys
):
    infer = tool('infer.py')
    for args, message in bad_cases(detector, segmentor, tmp_path / 'in'):
        before = listing(tmp_path / 'in')
        out = tmp_path / 'out'
        code, err = run(infer, [*args, '--out-dir', out], capsys)
        assert code == 1, (args, err)
        assert err.count('\n') == 1, err  # nothing but the error line
        assert error_line(err).startswith(f'error: {message}'), err
        assert not out.exists()
        assert listing(tmp_path / 'in') == before  # nothing ran


def test_a_real_process_prints_one_line_though_mmseg_warns(
    detector, segmentor, tmp_path
):
    # mmseg warns about its own deprecated calls while it builds the model;
    # pytest would catch those warnings in this process, so the command
    # runs in its own.
    out = tmp_path / 'out'
    args = [segmentor['config'], detector['checkpoint'], tmp_path]
    (tmp_path / 'a.png').write_bytes(
        (detector['root'] / 'coco' / 'val' / '000000.jpg').read_bytes()
    )
    result = subprocess.run(
        [sys.executable, str(TOOLS / 'infer.py'), *map(str, args)]
        + ['--out-dir', str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stdout == ''
    assert result.stderr.startswith(
        f"error: '{detector['checkpoint']}' does not fit EncoderDecoder: "
    )
    assert result.stderr.count('\n') == 1, result.stderr
    assert not out.exists()
