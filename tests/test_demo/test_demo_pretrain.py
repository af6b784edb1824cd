"""The demo's --pretrain and --compare: the shape crops, the pretraining and
its checkpoint in the detector, the plain ResNet-26, and the table."""

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope

from mmacmix.apis import build_runner
from mmacmix.datasets import (
    SHAPE_CLASSES,
    crop_box,
    generate_shape_crops,
    generate_shapes_dataset,
)
from mmacmix.demo.__main__ import main
from mmacmix.demo.comparison import (
    PLAIN,
    PRETRAINED,
    SCRATCH,
    comparison_configs,
    run_comparison,
)
from mmacmix.demo.pipeline import TINY_SHAPES as DEMO_TINY_SHAPES
from mmacmix.demo.pipeline import _replace_prefix
from mmacmix.demo.pretrain import pretrain_config
from mmacmix.models import ACmix

REPO = Path(__file__).resolve().parents[2]
CLASSIFIER_CONFIG = REPO / 'configs/demo/acmix-r26_shapes-cls.py'
ACMIX_CONFIG = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'
PLAIN_CONFIG = REPO / 'configs/demo/mask-rcnn_r26_fpn_shapes.py'


@pytest.fixture
def quick_config_text(monkeypatch):
    """Skips yapf's formatting of the config that every Runner logs and
    dumps (about 2 s a Runner here); the text is only read by people."""
    monkeypatch.setattr(
        Config, 'pretty_text', property(lambda cfg: str(cfg.to_dict()))
    )


@pytest.fixture
def shapes_copy(shapes_root, tmp_path) -> Path:
    """A private copy of the tiny dataset, to cut crops in."""
    return Path(shutil.copytree(shapes_root, tmp_path / 'shapes'))


def test_crop_box_is_a_square_with_margin_clipped_to_the_image():
    # Box 30x10 at (10, 20): side 30 * 1.3 = 39 around the centre (25, 25).
    assert crop_box([10, 20, 30, 10], (128, 128), 0.15) == (5, 5, 45, 45)
    # In a corner the square is cut by the image border.
    assert crop_box([0, 0, 20, 20], (128, 128), 0.15) == (0, 0, 23, 23)
    assert crop_box([110, 100, 18, 28], (128, 120), 0.0) == (
        105,
        100,
        120,
        128,
    )


def test_crops_are_the_annotated_regions_with_their_categories(shapes_copy):
    crops = Path(generate_shape_crops(str(shapes_copy), margin=0.15))
    assert crops == shapes_copy / 'cls'
    for split in ('train', 'val'):
        coco = json.loads(
            (
                shapes_copy / 'coco/annotations' / f'instances_{split}.json'
            ).read_text()
        )
        names = {c['id']: c['name'] for c in coco['categories']}
        annotations = {a['id']: a for a in coco['annotations']}
        sizes = {
            i['file_name']: (i['height'], i['width']) for i in coco['images']
        }
        records = json.loads((crops / f'crops_{split}.json').read_text())
        assert records['classes'] == list(SHAPE_CLASSES)
        records = records['crops']
        # One crop per annotation, each once.
        assert sorted(r['annotation_id'] for r in records) == sorted(
            annotations
        )
        lines = (crops / 'meta' / f'{split}.txt').read_text().splitlines()
        assert lines == [f'{r["file"]} {r["label"]}' for r in records]
        for record in records:
            annotation = annotations[record['annotation_id']]
            category = names[annotation['category_id']]
            assert record['label'] == SHAPE_CLASSES.index(category)
            assert record['file'].split('/')[0] == category
            x0, y0, x1, y1 = record['box']
            height, width = sizes[record['image']]
            x, y, w, h = annotation['bbox']
            assert 0 <= x0 <= x and x + w <= x1 <= width
            assert 0 <= y0 <= y and y + h <= y1 <= height
            clipped = x0 == 0 or y0 == 0 or x1 == width or y1 == height
            if not clipped:
                # Square up to the rounding of a half-pixel centre.
                assert min(x1 - x0, y1 - y0) >= 1.3 * max(w, h)
                assert abs((x1 - x0) - (y1 - y0)) <= 1
            image = cv2.imread(
                str(shapes_copy / 'coco' / split / record['image'])
            )
            crop = cv2.imread(str(crops / split / record['file']))
            assert np.array_equal(crop, image[y0:y1, x0:x1])
        # Every crop on disk is listed.
        assert len(list((crops / split).rglob('*.png'))) == len(records)


def test_classifier_config_reads_the_crops_with_their_labels(shapes_copy):
    from mmpretrain.registry import DATASETS

    crops = Path(generate_shape_crops(str(shapes_copy)))
    cfg = Config.fromfile(str(CLASSIFIER_CONFIG))
    _replace_prefix(cfg._cfg_dict, 'data/shapes/', f'{shapes_copy}/')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dataset = DATASETS.build(cfg.val_dataloader.dataset)
    assert dataset.metainfo['classes'] == SHAPE_CLASSES
    lines = (crops / 'meta/val.txt').read_text().splitlines()
    assert len(dataset) == len(lines) > 0
    for index, line in enumerate(lines):
        file, label = line.split()
        info = dataset.get_data_info(index)
        assert info['img_path'] == str(crops / 'val' / file)
        assert info['gt_label'] == int(label)
    sample = dataset[0]
    assert tuple(sample['inputs'].shape) == (3, *cfg.crop_size)


def test_crops_are_reused_checked_and_never_half_written(
    shapes_copy, monkeypatch
):
    crops = shapes_copy / 'cls'
    marker = crops / 'spec.json'
    generate_shape_crops(str(shapes_copy))
    written = marker.stat().st_mtime_ns
    generate_shape_crops(str(shapes_copy))  # the same: reused
    assert marker.stat().st_mtime_ns == written
    with pytest.raises(FileExistsError, match='another margin'):
        generate_shape_crops(str(shapes_copy), margin=0.3)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        generate_shape_crops(str(shapes_copy), margin=-0.1)
    with pytest.raises(FileNotFoundError, match='no shapes dataset'):
        generate_shape_crops(str(shapes_copy / 'coco'))

    # A run killed half-way leaves neither crops nor its temporary folder.
    shutil.rmtree(crops)
    calls = []

    def failing_imwrite(path, image):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return cv2.imwrite(path, image)

    monkeypatch.setattr('mmacmix.datasets.crops.cv2.imwrite', failing_imwrite)
    with pytest.raises(KeyboardInterrupt):
        generate_shape_crops(str(shapes_copy))
    assert len(calls) == 3
    assert not crops.exists()
    assert not list(shapes_copy.glob('.cls-*'))


def build_backbone(config: Path):
    from mmacmix.registry import MODELS

    return MODELS.build(Config.fromfile(str(config)).model.backbone)


def test_plain_resnet26_has_3x3_convs_where_acmix_r26_has_acmix():
    acmix = build_backbone(ACMIX_CONFIG)
    plain = build_backbone(PLAIN_CONFIG)
    acmix_ops = {
        name: module
        for name, module in acmix.named_modules()
        if isinstance(module, ACmix)
    }
    # The middle convolution of each of the 1 + 2 + 4 + 1 bottlenecks.
    assert sorted(acmix_ops) == sorted(
        f'layer{stage}.{block}.conv2'
        for stage, blocks in zip((1, 2, 3, 4), (1, 2, 4, 1))
        for block in range(blocks)
    )
    plain_modules = dict(plain.named_modules())
    assert not any(isinstance(m, ACmix) for m in plain_modules.values())
    for name, op in acmix_ops.items():
        conv = plain_modules[name]
        assert type(conv) is torch.nn.Conv2d
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
        assert conv.bias is None
        assert (conv.in_channels, conv.out_channels) == (
            op.in_channels,
            op.out_channels,
        )
        assert conv.stride == (op.stride,) * 2

    def outside(state: dict) -> dict:
        return {
            key: tuple(value.shape)
            for key, value in state.items()
            if not key.startswith(tuple(f'{name}.' for name in acmix_ops))
        }

    # Everything else: the same keys with the same shapes.
    assert outside(acmix.state_dict()) == outside(plain.state_dict())
    assert len(outside(plain.state_dict())) > 100

    # Parameters: the 3x3 kernels replace the ACmix ops' weights (shared
    # 1x1 projections, fewer than a 3x3 kernel's).
    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    kernels = sum(
        9 * op.in_channels * op.out_channels for op in acmix_ops.values()
    )
    ops = sum(count(op) for op in acmix_ops.values())
    assert count(plain) == count(acmix) - ops + kernels
    assert (count(acmix), count(plain)) == (8_438_816, 11_647_552)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        shapes = [f.shape for f in plain.eval()(images)]
        assert shapes == [f.shape for f in acmix.eval()(images)]


def test_every_detector_run_has_the_same_recipe(tmp_path):
    configs = comparison_configs(
        [SCRATCH, PRETRAINED, PLAIN],
        str(tmp_path / 'shapes'),
        str(tmp_path / 'out'),
        max_iters=100,
        checkpoint='pretrain/iter_5.pth',
    )
    assert list(configs) == ['acmix-r26', 'acmix-r26_pretrained', 'r26']
    plain = {name: cfg.to_dict() for name, cfg in configs.items()}
    for name, cfg in plain.items():
        assert cfg['train_cfg']['max_iters'] == 100
        assert cfg['work_dir'] == str(tmp_path / 'out' / name / 'train')
        assert (
            cfg['train_dataloader']['dataset']['data_root']
            == str(tmp_path / 'shapes' / 'coco') + '/'
        )
        cfg.pop('work_dir')
        cfg.pop('experiment_name')
        cfg.pop('filename', None)
    backbones = {
        name: cfg['model'].pop('backbone') for name, cfg in plain.items()
    }
    # Only the backbone differs, and only as each run says.
    assert plain['acmix-r26'] == plain['acmix-r26_pretrained'] == plain['r26']
    assert backbones['acmix-r26_pretrained'].pop('init_cfg') == dict(
        type='Pretrained',
        checkpoint=os.path.abspath('pretrain/iter_5.pth'),
        prefix='backbone.',
    )
    assert backbones['r26'].pop('acmix_stages') == (False,) * 4
    assert backbones['acmix-r26'] == backbones['acmix-r26_pretrained']
    assert backbones['acmix-r26'] == backbones['r26']


class _Stop(Exception):
    pass


class CaptureStart(Hook):
    """Keeps the backbone's weights as training starts, then stops it."""

    def before_train(self, runner) -> None:
        self.state = {
            key: value.clone()
            for key, value in runner.model.backbone.state_dict().items()
        }
        raise _Stop


def weights_at_start(cfg: Config) -> dict:
    runner = build_runner(cfg)
    hook = CaptureStart()
    runner.register_hook(hook, 'VERY_HIGH')
    with pytest.raises(_Stop):
        runner.train()
    return hook.state


def test_seed_reaches_every_run_and_only_the_seed_changes(
    tmp_path, quick_config_text
):
    data_root = str(tmp_path / 'shapes')
    generate_shapes_dataset(data_root, DEMO_TINY_SHAPES)
    by_seed = {
        seed: comparison_configs(
            [SCRATCH, PLAIN],
            data_root,
            str(tmp_path / 'out'),
            tiny=True,
            seed=seed,
        )
        for seed in (None, 7)
    }
    for name, cfg in by_seed[7].items():
        default = by_seed[None][name].to_dict()
        seeded = cfg.to_dict()
        # The configs' own seed without --seed, the given one with it, and
        # nothing else moved.
        assert default['randomness']['seed'] == 0
        assert seeded['randomness'].pop('seed') == 7
        default['randomness'].pop('seed')
        assert seeded == default
    cfg = pretrain_config(
        str(CLASSIFIER_CONFIG), data_root, str(tmp_path / 'cls'), seed=7
    )
    assert cfg.randomness.seed == 7
    # The seed decides the detector's initial weights.
    starts = [
        weights_at_start(by_seed[seed][SCRATCH.name]) for seed in (None, 7)
    ]
    again = weights_at_start(by_seed[None][SCRATCH.name])
    assert all(torch.equal(starts[0][key], again[key]) for key in again)
    stem = [start['conv1.weight'] for start in starts]
    assert not torch.equal(*stem)


def test_detector_starts_from_the_classifier_checkpoint_strictly(
    tmp_path, quick_config_text
):
    from mmpretrain.registry import MODELS

    data_root = str(tmp_path / 'shapes')
    generate_shapes_dataset(data_root, DEMO_TINY_SHAPES)
    # A classifier of the demo's config with weights and BN statistics
    # unlike any initialisation, saved as mmpretrain's Runner saves it.
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(
            Config.fromfile(str(CLASSIFIER_CONFIG)).model
        )
    with torch.no_grad():
        for value in classifier.state_dict().values():
            if value.is_floating_point():
                value.uniform_(0.5, 1.5)
            else:
                value.fill_(7)  # BN's num_batches_tracked
    state = classifier.state_dict()
    checkpoint = tmp_path / 'iter_270.pth'
    torch.save({'meta': {'iter': 270}, 'state_dict': state}, checkpoint)
    expected = {
        key.removeprefix('backbone.'): value
        for key, value in state.items()
        if key.startswith('backbone.')
    }
    assert {key.split('.')[0] for key in state} == {'backbone', 'head'}

    configs = comparison_configs(
        [SCRATCH, PRETRAINED],
        data_root,
        str(tmp_path / 'out'),
        tiny=True,
        checkpoint=str(checkpoint),
    )
    pretrained = weights_at_start(configs[PRETRAINED.name])
    assert pretrained.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(pretrained[key], value), key
    scratch = weights_at_start(configs[SCRATCH.name])
    assert scratch.keys() == expected.keys()
    same = [k for k, v in expected.items() if torch.equal(scratch[k], v)]
    assert same == []

    # Strict: a checkpoint that lacks a backbone tensor is refused.
    from mmdet.registry import MODELS as DETECTORS

    del state['backbone.layer1.0.conv1.weight']
    torch.save({'meta': {}, 'state_dict': state}, checkpoint)
    with DefaultScope.overwrite_default_scope('mmdet'):
        detector = DETECTORS.build(configs[PRETRAINED.name].model)
    with pytest.raises(KeyError, match=r'1 missing keys.*layer1\.0\.conv1'):
        detector.init_weights()


def independent_predictions(checkpoint: Path, crops: Path) -> list[tuple]:
    """The classifier's labels and scores for the validation crops, from
    the checkpoint, with cv2 and torch alone instead of mmpretrain's
    pipeline and data preprocessor."""
    from mmpretrain.registry import MODELS

    cfg = Config.fromfile(str(CLASSIFIER_CONFIG))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    state = torch.load(checkpoint, weights_only=False)['state_dict']
    model.load_state_dict(state, strict=True)
    model.eval()
    mean = torch.tensor(cfg.data_preprocessor.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data_preprocessor.std).view(3, 1, 1)
    results = []
    for line in (crops / 'meta/val.txt').read_text().splitlines():
        file, label = line.split()
        image = cv2.imread(str(crops / 'val' / file))
        height, width = cfg.crop_size
        image = cv2.resize(image, (width, height), cv2.INTER_LINEAR)
        rgb = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1)
        inputs = ((rgb.float() - mean) / std)[None]
        with torch.no_grad():
            scores = model(inputs, mode='tensor').softmax(-1)[0]
        results.append((file, int(label), int(scores.argmax()), scores))
    return results


def test_tiny_pretrain_and_compare_report_what_the_models_do(
    tmp_path, quick_config_text
):
    out_dir, data_root = tmp_path / 'out', tmp_path / 'shapes'
    result = run_comparison(
        out_dir=str(out_dir),
        data_root=str(data_root),
        pretrain=True,
        compare=True,
        tiny=True,
        num_images=1,
        progress=False,
    )
    # The pretraining's top-1 is the share of right predictions, and the
    # predictions are what the checkpoint's model computes.
    pretrain = out_dir / 'pretrain'
    metrics = json.loads((pretrain / 'metrics.json').read_text())
    predictions = json.loads((pretrain / 'predictions.json').read_text())
    right = sum(p['label'] == p['pred'] for p in predictions)
    assert metrics['accuracy/top1'] == pytest.approx(
        100 * right / len(predictions)
    )
    assert metrics['val_crops'] == len(predictions) > 0
    checkpoint = Path(metrics['checkpoint'])
    assert checkpoint == pretrain / 'train' / 'iter_2.pth'
    expected = independent_predictions(checkpoint, data_root / 'cls')
    assert [(p['file'], p['label'], p['pred']) for p in predictions] == [
        e[:3] for e in expected
    ]
    for record, (*_, scores) in zip(predictions, expected):
        torch.testing.assert_close(
            torch.tensor(record['scores']), scores, rtol=0, atol=1e-5
        )

    # One table of the three runs at equal iterations.
    summary = json.loads((out_dir / 'summary.json').read_text())
    assert summary == result.summary
    assert summary['pretrain']['top1'] == metrics['accuracy/top1']
    assert summary['pretrain']['checkpoint'] == str(checkpoint)
    assert [r['name'] for r in summary['runs']] == [
        'acmix-r26',
        'acmix-r26_pretrained',
        'r26',
    ]
    table = (out_dir / 'summary.md').read_text().splitlines()
    rows = [line for line in table if line.startswith('| ')][1:]
    assert len(rows) == 3
    for run, row in zip(summary['runs'], rows):
        run_metrics = json.loads(
            (out_dir / run['name'] / 'metrics.json').read_text()
        )
        assert run_metrics['iterations'] == summary['iterations'] == 2
        assert run['bbox_mAP'] == run_metrics['coco/bbox_mAP']
        assert run['segm_mAP'] == run_metrics['coco/segm_mAP']
        assert run['seconds'] == run_metrics['train_and_eval_seconds'] > 0
        cells = [cell.strip() for cell in row.strip('|').split('|')]
        assert cells[0] == run['backbone']
        assert cells[2:] == [
            f'{run["bbox_mAP"]:.3f}',
            f'{run["segm_mAP"]:.3f}',
            f'{run["seconds"]:.0f}',
        ]
        assert (out_dir / run['name'] / 'train' / 'iter_2.pth').is_file()
    assert f'top-1 {metrics["accuracy/top1"]:.1f} %' in rows[1]


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--pretrain', '--config', 'x.py'], '--config cannot be combined'),
        (['--compare', '--config', 'x.py'], '--config cannot be combined'),
        (['--pretrain-iters', '5'], '--pretrain-iters needs --pretrain'),
        (['--pretrain', '--pretrain-iters', '0'], 'positive integer'),
        (['--data-only', '--compare'], '--data-only trains nothing'),
    ],
)
def test_conflicting_flags_are_refused_before_any_work(
    argv, message, tmp_path, capsys
):
    out_dir = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                *argv,
                '--out-dir',
                str(out_dir),
                '--data-root',
                str(tmp_path / 'd'),
            ]
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_comparison_arguments_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match='set pretrain or compare'):
        run_comparison(str(tmp_path / 'o'), pretrain=False, compare=False)
    with pytest.raises(ValueError, match='pretrain_iters must be a positive'):
        run_comparison(str(tmp_path / 'o'), pretrain_iters=0)
    with pytest.raises(ValueError, match='but pretrain is not set'):
        run_comparison(
            str(tmp_path / 'o'), pretrain=False, compare=True, pretrain_iters=3
        )
    (tmp_path / 'file').write_text('')
    with pytest.raises(NotADirectoryError, match='data folder'):
        run_comparison(str(tmp_path / 'o'), data_root=str(tmp_path / 'file'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']
