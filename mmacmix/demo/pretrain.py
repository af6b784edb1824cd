"""The demo's pretraining: ACmix-ResNet-26 classifies crops of the shapes.

:func:`pretrain_classifier` trains the mmpretrain ``ImageClassifier`` of
``configs/demo/acmix-r26_shapes-cls.py`` on the crops that
:func:`~mmacmix.datasets.generate_shape_crops` cuts out of the shapes
dataset, and writes into ``out_dir``:

* ``metrics.json``: top-1 on the validation crops (mmpretrain's
  ``Accuracy``, in percent), iterations, crops, seconds, threads and CPU;
* ``predictions.json``: for every validation crop, its file, label,
  predicted label and class scores;
* ``loss_curve.png``: the training loss per iteration;
* ``train/``: the Runner's work folder, with the checkpoint
  (``iter_N.pth``: ``backbone.*`` and ``head.*`` keys) that the detector
  starts from.
"""

import os.path as osp
import time
from dataclasses import dataclass, field

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from mmacmix.configs import find_config

from .pipeline import (
    _chatter_to_log,
    cpu_name,
    plot_losses,
    scalars_file,
    short_run_config,
    train_quietly,
    write_json,
)

CLASSIFIER_CONFIG = 'demo/acmix-r26_shapes-cls.py'


@dataclass
class PretrainResult:
    """What :func:`pretrain_classifier` produced.

    Attributes:
        checkpoint (str): The Runner's final checkpoint.
        metrics (dict): ``accuracy/top1`` (percent) and the run's facts.
        files (dict): Paths of ``metrics``, ``predictions`` and
            ``loss_curve``.
    """

    checkpoint: str
    metrics: dict
    files: dict = field(default_factory=dict)


def classifier_config() -> str:
    """Path of the demo's classifier config, installed or in a checkout."""
    return find_config(CLASSIFIER_CONFIG)


def pretrain_config(
    config: str,
    data_root: str,
    work_dir: str,
    tiny: bool = False,
    max_iters: int | None = None,
    seed: int | None = None,
) -> Config:
    """Loads the classifier config, pointed at the crops of ``data_root``.

    Args:
        config (str): The classifier config.
        data_root (str): The shapes dataset whose ``cls`` folder holds the
            crops (every config path under ``data/shapes/`` moves there).
        work_dir (str): The Runner's work folder.
        tiny (bool): A seconds-long run: 2 iterations of batch 8.
        max_iters (int, optional): Training iterations (the warm-up and
            cosine decay are stretched to them).
        seed (int, optional): The random seed, instead of the config's.

    Returns:
        Config: The config to build the Runner from.
    """
    batches = dict(train_dataloader=8, val_dataloader=8) if tiny else None
    cfg = short_run_config(
        config, data_root, work_dir, max_iters, batches, seed
    )
    # The Runner names its logger and visualizer after the experiment; a
    # name of its own keeps them apart from the detectors' in one process.
    cfg.experiment_name = 'pretrain'
    return cfg


def pretrain_classifier(
    data_root: str,
    out_dir: str,
    tiny: bool = False,
    max_iters: int | None = None,
    step: str = '[3/6]',
    progress: bool = True,
    seed: int | None = None,
) -> PretrainResult:
    """Pretrains ACmix-ResNet-26 on the shape crops; see the module doc.

    Args:
        data_root (str): A shapes dataset whose crops exist
            (:func:`~mmacmix.datasets.generate_shape_crops`).
        out_dir (str): Folder of the results.
        tiny (bool): A seconds-long smoke run. Defaults to False.
        max_iters (int, optional): Overrides the config's iterations.
        step (str): The console's prefix of the step. Defaults to
            ``'[3/6]'``.
        progress (bool): Print the step and a progress bar. Defaults to
            True.
        seed (int, optional): The random seed, instead of the config's.

    Returns:
        PretrainResult: The checkpoint, metrics and files.

    Raises:
        FileNotFoundError: If the Runner wrote no final checkpoint.
    """
    say = print if progress else (lambda *args, **kwargs: None)
    start = time.perf_counter()
    cfg = pretrain_config(
        classifier_config(),
        data_root,
        osp.join(out_dir, 'train'),
        tiny=tiny,
        max_iters=max_iters,
        seed=seed,
    )
    iterations = cfg.train_cfg.max_iters
    height, width = cfg.crop_size
    say(
        f'{step} pretraining the ACmix-R26 classifier for {iterations} '
        f'iterations (batch {cfg.train_dataloader.batch_size}, '
        f'{height}x{width} crops) on the CPU'
    )
    runner, progress_hook = train_quietly(
        cfg,
        progress=progress,
        val_message='      evaluation on the validation crops',
    )
    seconds = time.perf_counter() - start
    checkpoint = osp.join(runner.work_dir, f'iter_{iterations}.pth')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(
            f'pretraining wrote no checkpoint {checkpoint!r}'
        )
    predictions = predict(runner)
    files = dict(
        metrics=osp.join(out_dir, 'metrics.json'),
        predictions=write_json(
            predictions, osp.join(out_dir, 'predictions.json')
        ),
    )
    with _chatter_to_log(runner.logger):
        files['loss_curve'] = plot_losses(
            scalars_file(runner),
            osp.join(out_dir, 'loss_curve.png'),
            title='ACmix-R26 classifier on shape crops (CPU)',
        )
    metrics = {
        'accuracy/top1': float(progress_hook.metrics['accuracy/top1']),
        'iterations': iterations,
        'train_crops': len(runner.train_dataloader.dataset),
        'val_crops': len(predictions),
        'train_and_eval_seconds': round(seconds, 1),
        'threads': torch.get_num_threads(),
        'cpu': cpu_name(),
        'checkpoint': checkpoint,
    }
    write_json(metrics, files['metrics'])
    say(
        f'      top-1 {metrics["accuracy/top1"]:.1f} % on '
        f'{metrics["val_crops"]} validation crops ({seconds:.0f} s)'
    )
    return PretrainResult(checkpoint, metrics, files)


def predict(runner: Runner) -> list[dict]:
    """The trained classifier's prediction for every validation crop.

    Args:
        runner (Runner): A runner whose model is trained.

    Returns:
        list[dict]: Per crop, in the dataset's order: ``file`` (below the
        validation folder), ``label``, ``pred`` and ``scores`` (one per
        class).
    """
    model = runner.model
    model.eval()
    dataloader = runner.val_dataloader
    prefix = dataloader.dataset.img_prefix
    records = []
    for batch in dataloader:
        with torch.no_grad():
            samples = model.val_step(batch)
        for sample in samples:
            records.append(
                dict(
                    file=osp.relpath(sample.img_path, prefix),
                    label=int(sample.gt_label),
                    pred=int(sample.pred_label),
                    scores=[float(s) for s in sample.pred_score],
                )
            )
    return records
