"""The demo's ``--pretrain`` and ``--compare``: several detectors, one table.

:func:`run_comparison` trains the demo's Mask R-CNN more than once, at equal
iterations, on the same data and with the same recipe; the runs differ only
in how the backbone starts or which operator it uses:

* ``acmix-r26``: ACmix-ResNet-26 from scratch, the plain demo's run;
* ``acmix-r26_pretrained`` (``--pretrain``): the same, its backbone loaded
  (strictly) from ACmix-ResNet-26 pretrained as a classifier of the shape
  crops (:mod:`mmacmix.demo.pretrain`);
* ``r26`` (``--compare``): the plain ResNet-26 from scratch, the same
  skeleton with a 3x3 convolution wherever ACmix-ResNet-26 has ACmix
  (``configs/demo/mask-rcnn_r26_fpn_shapes.py``).

Each run writes the plain demo's files into ``out_dir/<run>/``, the
pretraining its own into ``out_dir/pretrain/``, and the table goes to
``out_dir/summary.md`` and ``out_dir/summary.json``. If any step fails,
``out_dir`` is left as it was.
"""

import os.path as osp
from dataclasses import dataclass, field

import torch
from mmengine.config import Config

from mmacmix.configs import find_config
from mmacmix.datasets import generate_shape_crops, generate_shapes_dataset
from mmacmix.fileio import atomic_path

from .pipeline import (
    DETECTION,
    DemoResult,
    check_demo_arguments,
    check_iterations,
    cpu_name,
    default_config,
    demo_config,
    kept_whole,
    train_and_evaluate,
    write_json,
)
from .pretrain import PretrainResult, pretrain_classifier

PLAIN_CONFIG = 'demo/mask-rcnn_r26_fpn_shapes.py'


@dataclass(frozen=True)
class Run:
    """One detector of the comparison.

    Attributes:
        name (str): Its folder under ``out_dir``.
        backbone (str): The backbone, for the table.
        start (str): How the backbone starts, for the table.
    """

    name: str
    backbone: str
    start: str


SCRATCH = Run('acmix-r26', 'ACmix-ResNet-26', 'from scratch')
PRETRAINED = Run(
    'acmix-r26_pretrained', 'ACmix-ResNet-26', 'pretrained on shape crops'
)
PLAIN = Run('r26', 'ResNet-26', 'from scratch')


@dataclass
class ComparisonResult:
    """What :func:`run_comparison` produced.

    Attributes:
        runs (dict[str, DemoResult]): Each detector's result, by run name.
        pretrain (PretrainResult, optional): The pretraining, if any.
        summary (dict): What ``summary.json`` holds.
        files (dict): Paths of ``summary_json`` and ``summary_md``.
    """

    runs: dict[str, DemoResult]
    pretrain: PretrainResult | None
    summary: dict
    files: dict = field(default_factory=dict)


def planned_runs(pretrain: bool, compare: bool) -> list[Run]:
    """The detectors to train, in order.

    Raises:
        ValueError: If neither ``pretrain`` nor ``compare`` is set.
    """
    if not (pretrain or compare):
        raise ValueError('nothing to compare: set pretrain or compare')
    return (
        [SCRATCH]
        + ([PRETRAINED] if pretrain else [])
        + ([PLAIN] if compare else [])
    )


def comparison_configs(
    runs: list[Run],
    data_root: str,
    out_dir: str,
    tiny: bool = False,
    max_iters: int | None = None,
    checkpoint: str | None = None,
    seed: int | None = None,
) -> dict[str, Config]:
    """The detector config of every run.

    All come from :func:`~mmacmix.demo.pipeline.demo_config` with the same
    data, iterations and recipe. The pretrained run adds
    ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``
    to the backbone (loaded with strict key matching); the plain run reads
    ``configs/demo/mask-rcnn_r26_fpn_shapes.py``, which swaps only the
    backbone's operator.

    Args:
        runs (list[Run]): From :func:`planned_runs`.
        data_root (str): The shapes dataset.
        out_dir (str): The comparison's folder (each run's work folder is
            ``out_dir/<run>/train``).
        tiny (bool): Seconds-long runs. Defaults to False.
        max_iters (int, optional): Every detector's iterations.
        checkpoint (str, optional): The pretrained classifier; needed by
            the pretrained run.
        seed (int, optional): Every run's random seed, instead of the
            configs' (0).

    Returns:
        dict[str, Config]: Configs by run name.

    Raises:
        ValueError: If the pretrained run has no ``checkpoint``.
    """
    configs = {}
    for run in runs:
        path = find_config(PLAIN_CONFIG) if run == PLAIN else default_config()
        cfg = demo_config(
            path,
            data_root,
            osp.join(out_dir, run.name, 'train'),
            tiny=tiny,
            max_iters=max_iters,
            seed=seed,
        )
        if run == PRETRAINED:
            if checkpoint is None:
                raise ValueError('the pretrained run needs a checkpoint')
            cfg.model.backbone.init_cfg = dict(
                type='Pretrained',
                checkpoint=osp.abspath(checkpoint),
                prefix='backbone.',
            )
        # The Runner names its logger and visualizer after the experiment
        # (mmdet's runtime names the visualizer 'visualizer' instead): runs
        # in one process must not share them, or one run's logs and scalars
        # land in another's folder.
        cfg.experiment_name = run.name
        cfg.visualizer.pop('name', None)
        configs[run.name] = cfg
    return configs


def run_comparison(
    out_dir: str = 'work_dirs/demo',
    data_root: str = 'data/shapes',
    pretrain: bool = True,
    compare: bool = False,
    tiny: bool = False,
    max_iters: int | None = None,
    pretrain_iters: int | None = None,
    num_images: int = 4,
    progress: bool = True,
    seed: int | None = None,
) -> ComparisonResult:
    """Runs the comparison; see the module docstring for what it writes.

    Args:
        out_dir (str): Folder of the results. Defaults to
            ``'work_dirs/demo'``.
        data_root (str): Folder of the shapes dataset (and of its crops,
            ``cls/``), generated there if absent. Defaults to
            ``'data/shapes'``.
        pretrain (bool): Pretrain ACmix-ResNet-26 on the shape crops and
            train a detector from it. Defaults to True.
        compare (bool): Train the detector with a plain ResNet-26 too.
            Defaults to False.
        tiny (bool): A seconds-long smoke run of every step; its numbers
            mean nothing. Defaults to False.
        max_iters (int, optional): Every detector's iterations.
        pretrain_iters (int, optional): The pretraining's iterations.
        num_images (int): Validation images to draw per detector.
            Defaults to 4.
        progress (bool): Show the steps and progress bars. Defaults to
            True.
        seed (int, optional): The random seed of the pretraining and of
            every detector, instead of the configs' (0).

    Returns:
        ComparisonResult: Every run's result and the table.

    Raises:
        ValueError: If neither ``pretrain`` nor ``compare`` is set, an
            iteration count is not a positive integer, or
            ``pretrain_iters`` is given without ``pretrain``.
        OSError: If ``out_dir`` or ``data_root`` cannot be a folder, or
            ``data_root`` holds data of another spec.
    """
    say = print if progress else (lambda *args, **kwargs: None)
    runs = planned_runs(pretrain, compare)
    if pretrain_iters is not None and not pretrain:
        raise ValueError('pretrain_iters is given, but pretrain is not set')
    check_iterations(pretrain_iters, 'pretrain_iters')
    spec, data_root = check_demo_arguments(out_dir, data_root, tiny, max_iters)
    total = 1 + 2 * pretrain + len(runs)
    step = iter(f'[{i}/{total}]' for i in range(1, total + 1))

    with kept_whole(out_dir):
        say(
            f'{next(step)} shapes dataset in {data_root} ...',
            end=' ',
            flush=True,
        )
        generate_shapes_dataset(data_root, spec)
        say(f'{spec.num_train} train / {spec.num_val} val images')
        pretrained = None
        if pretrain:
            crops = osp.join(data_root, 'cls')
            say(
                f'{next(step)} shape crops in {crops} ...', end=' ', flush=True
            )
            generate_shape_crops(data_root)
            say(
                f'{_count_lines(crops, "train")} train / '
                f'{_count_lines(crops, "val")} val crops'
            )
            pretrained = pretrain_classifier(
                data_root,
                osp.join(out_dir, 'pretrain'),
                tiny=tiny,
                max_iters=pretrain_iters,
                step=next(step),
                progress=progress,
                seed=seed,
            )
        configs = comparison_configs(
            runs,
            data_root,
            out_dir,
            tiny=tiny,
            max_iters=max_iters,
            checkpoint=pretrained.checkpoint if pretrained else None,
            seed=seed,
        )
        results = {}
        for run in runs:
            name = f'{run.backbone} Mask R-CNN {run.start}'
            result = train_and_evaluate(
                configs[run.name],
                osp.join(out_dir, run.name),
                name=name,
                steps=(next(step), '     ', '     '),
                num_images=num_images,
                progress=progress,
                title=f'{run.backbone} Mask R-CNN, {run.start} (CPU)',
            )
            metrics = result.metrics
            say(
                f'      {DETECTION.result_line(metrics)} '
                f'({metrics["train_and_eval_seconds"]:.0f} s)'
            )
            results[run.name] = result

        summary = summarise(
            runs,
            results,
            pretrained,
            spec.num_val,
            configs[runs[0].name].randomness.seed,
        )
        files = dict(
            summary_json=write_json(
                summary, osp.join(out_dir, 'summary.json')
            ),
            summary_md=osp.join(out_dir, 'summary.md'),
        )
        table = summary_table(summary)
        with atomic_path(files['summary_md']) as partial:
            with open(partial, 'w') as file:
                file.write(table)
    say(table, end='')
    say(f'Results in {out_dir}/')
    return ComparisonResult(results, pretrained, summary, files)


def _count_lines(crops: str, split: str) -> int:
    with open(osp.join(crops, 'meta', f'{split}.txt')) as file:
        return sum(1 for _ in file)


def summarise(
    runs: list[Run],
    results: dict[str, DemoResult],
    pretrained: PretrainResult | None,
    val_images: int,
    seed: int = 0,
) -> dict:
    """What ``summary.json`` holds: the setting, then one entry per run."""
    first = results[runs[0].name].metrics
    summary = dict(
        iterations=first['iterations'],
        seed=seed,
        val_images=val_images,
        threads=torch.get_num_threads(),
        cpu=cpu_name(),
        pretrain=None,
        runs=[],
    )
    if pretrained is not None:
        summary['pretrain'] = dict(
            top1=pretrained.metrics['accuracy/top1'],
            iterations=pretrained.metrics['iterations'],
            val_crops=pretrained.metrics['val_crops'],
            seconds=pretrained.metrics['train_and_eval_seconds'],
            checkpoint=pretrained.checkpoint,
        )
    for run in runs:
        metrics = results[run.name].metrics
        summary['runs'].append(
            dict(
                name=run.name,
                backbone=run.backbone,
                start=run.start,
                bbox_mAP=metrics.get('coco/bbox_mAP'),
                segm_mAP=metrics.get('coco/segm_mAP'),
                seconds=metrics['train_and_eval_seconds'],
            )
        )
    return summary


def summary_table(summary: dict) -> str:
    """The Markdown table of a summary, with a line saying how it ran."""
    lines = [
        f'Mask R-CNN on the shapes, {summary["iterations"]} iterations each, '
        f'seed {summary["seed"]}, '
        f'COCO mAP on {summary["val_images"]} validation images; '
        f'{summary["threads"]} thread{"s" * (summary["threads"] != 1)}, '
        f'{summary["cpu"]}.',
        '',
        '| backbone | start | bbox mAP | mask mAP | seconds |',
        '|---|---|---|---|---|',
    ]
    pretrain = summary['pretrain']
    for run in summary['runs']:
        start = run['start']
        if run['name'] == PRETRAINED.name and pretrain is not None:
            start += (
                f' (top-1 {pretrain["top1"]:.1f} % on '
                f'{pretrain["val_crops"]} crops, {pretrain["iterations"]} '
                f'iterations, {pretrain["seconds"]:.0f} s)'
            )
        lines.append(
            f'| {run["backbone"]} | {start} | {_score(run["bbox_mAP"])} | '
            f'{_score(run["segm_mAP"])} | {run["seconds"]:.0f} |'
        )
    return '\n'.join(lines) + '\n'


def _score(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.3f}'
