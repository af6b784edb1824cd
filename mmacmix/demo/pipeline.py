"""The end-to-end demo: data, training, evaluation, plots.

:func:`run_demo` generates the synthetic shapes dataset (once, under
``data_root``), trains the ACmix Mask R-CNN of
``configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py`` (or another config on
the shapes: an mmdet detector, or an mmseg segmentor such as
``configs/demo/acmix-r26_upernet_shapes.py``) with MMEngine's Runner on
the CPU, evaluates it on the validation split (mmdet's ``CocoMetric``, or
mmseg's ``IoUMetric``), and writes into ``out_dir``:

* ``metrics.json``: the COCO metrics (or mIoU, aAcc and mAcc, in
  percent), iterations, wall time, threads and CPU;
* ``loss_curve.png``: training loss (and its parts) per iteration;
* ``predictions/*.png``: validation images, ground truth left, predicted
  boxes and masks (or classes of the pixels) right;
* ``train/``: the Runner's work folder (log, config, final checkpoint).

A config the demo cannot run (another codebase, data other than the
shapes) is refused before any work, and a run that fails leaves ``out_dir``
as it found it (:func:`kept_whole`).

``--pretrain`` and ``--compare`` train several detectors with
:func:`train_and_evaluate` and tabulate them: see
:mod:`mmacmix.demo.comparison`.
"""

import contextlib
import io
import json
import logging
import os
import os.path as osp
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import MMLogger
from mmengine.runner import Runner

from mmacmix.apis import (
    add_project_hooks,
    build_model,
    build_runner,
    load_config,
)
from mmacmix.apis.inference import infer_command_after_training
from mmacmix.cli import holding_warnings, log_held_warnings
from mmacmix.configs import find_config
from mmacmix.datasets import ShapesSpec, generate_shapes_dataset
from mmacmix.fileio import atomic_path, check_folder

# The dataset the demo trains on: 128x128 images with up to five partly
# hidden shapes each on a striped, noisy background.
DEMO_SHAPES = ShapesSpec(
    num_train=1000, num_val=100, image_size=(128, 128), max_instances=5
)
TINY_SHAPES = ShapesSpec(
    num_train=8, num_val=4, image_size=(128, 128), max_instances=3
)
CONFIG_DATA_ROOT = 'data/shapes/'
PLOT_TITLE = 'ACmix-R26 Mask R-CNN on synthetic shapes (CPU)'
# What train_and_evaluate adds to the evaluation's metrics.
RUN_KEYS = ('iterations', 'train_and_eval_seconds', 'threads', 'cpu')


@dataclass(frozen=True)
class DemoTask:
    """What the demo does with a config of one codebase.

    Attributes:
        scope (str): The config's ``default_scope``.
        model (str): What is trained, for the console.
        evaluation (str): The evaluation step, for the console.
        title (str): The loss plot's title.
        scores (tuple[tuple[str, str], ...]): The metrics printed at the
            end, as ``(key, label)``; percentages for segmentation.
    """

    scope: str
    model: str
    evaluation: str
    title: str
    scores: tuple[tuple[str, str], ...]

    def result_line(self, metrics: dict) -> str:
        """``'bbox mAP 0.412, mask mAP 0.380'``, ``'mIoU 61.3 %, ...'``."""
        form = '{:.1f} %' if self.scope == 'mmseg' else '{:.3f}'
        return ', '.join(
            f'{label} {form.format(metrics.get(key, float("nan")))}'
            for key, label in self.scores
        )


DETECTION = DemoTask(
    'mmdet',
    'ACmix Mask R-CNN',
    'COCO evaluation',
    PLOT_TITLE,
    (('coco/bbox_mAP', 'bbox mAP'), ('coco/segm_mAP', 'mask mAP')),
)
SEGMENTATION = DemoTask(
    'mmseg',
    'ACmix UperNet',
    'mIoU evaluation',
    'ACmix-R26 UperNet on synthetic shapes (CPU)',
    (('mIoU', 'mIoU'), ('aAcc', 'aAcc')),
)
TASKS = {task.scope: task for task in (DETECTION, SEGMENTATION)}


def default_config() -> str:
    """Path of the demo's Mask R-CNN config, installed or in a checkout."""
    return find_config('demo/mask-rcnn_acmix-r26_fpn_shapes.py')


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        metrics (dict): COCO metrics (``coco/bbox_mAP``...) and timings.
        files (dict): Paths of ``metrics``, ``loss_curve`` and
            ``predictions`` (a list).
    """

    metrics: dict
    files: dict = field(default_factory=dict)


def run_demo(
    out_dir: str = 'work_dirs/demo',
    data_root: str = 'data/shapes',
    config: str | None = None,
    tiny: bool = False,
    max_iters: int | None = None,
    num_images: int = 4,
    progress: bool = True,
    seed: int | None = None,
) -> DemoResult:
    """Runs the whole demo; see the module docstring for what it writes.

    Args:
        out_dir (str): Folder of the results. Defaults to
            ``'work_dirs/demo'``.
        data_root (str): Folder of the shapes dataset, generated there if
            absent. Defaults to ``'data/shapes'``.
        config (str, optional): An mmdet or mmseg config on the shapes;
            defaults to the demo's Mask R-CNN.
        tiny (bool): A seconds-long smoke run (8 training images, 2
            iterations of batch 2) that exercises every step. Its numbers
            mean nothing.
        max_iters (int, optional): Overrides the config's iterations.
        num_images (int): Validation images to draw. Defaults to 4.
        progress (bool): Show a progress bar. Defaults to True.
        seed (int, optional): Overrides the config's random seed (0).

    Returns:
        DemoResult: Metrics and file paths.

    Raises:
        ValueError: If ``max_iters`` is not a positive integer, or the
            config is neither an mmdet nor an mmseg config on the shapes
            (checked before anything is written).
        OSError: If ``out_dir`` or ``data_root`` cannot be a folder, or
            ``data_root`` holds a dataset of another spec (checked before
            anything is written).
    """
    start = time.perf_counter()
    say = print if progress else (lambda *args, **kwargs: None)
    spec, data_root = check_demo_arguments(out_dir, data_root, tiny, max_iters)
    config = config or default_config()
    work_dir = osp.join(out_dir, 'train')
    loaded = load_config(config, work_dir=work_dir)
    task = demo_task(loaded, config)
    cfg = demo_config(
        loaded, data_root, work_dir, tiny=tiny, max_iters=max_iters, seed=seed
    )
    with holding_warnings():  # for the log, once it exists
        check_model(cfg)
    with kept_whole(out_dir):
        say(f'[1/4] shapes dataset in {data_root} ...', end=' ', flush=True)
        generate_shapes_dataset(data_root, spec)
        data_seconds = time.perf_counter() - start
        say(f'{spec.num_train} train / {spec.num_val} val images')
        result = train_and_evaluate(
            cfg, out_dir, task=task, num_images=num_images, progress=progress
        )
        run = result.metrics
        # The evaluation's metrics first, then the usual keys in order.
        metrics = {k: v for k, v in run.items() if k not in RUN_KEYS}
        metrics.update(
            iterations=run['iterations'],
            train_images=spec.num_train,
            val_images=spec.num_val,
            data_seconds=round(data_seconds, 1),
            train_and_eval_seconds=run['train_and_eval_seconds'],
            wall_seconds=round(time.perf_counter() - start, 1),
            threads=run['threads'],
            cpu=run['cpu'],
            seed=cfg.randomness.seed,
        )
        result.metrics = metrics
        write_json(metrics, result.files['metrics'])
    say(
        f'{task.result_line(metrics)} ({spec.num_val} val images); '
        f'{metrics["wall_seconds"]:.0f} s in all. Results in {out_dir}/'
    )
    say(f'Run it on an image: {infer_command_after_training(cfg, out_dir)}')
    return result


def demo_task(cfg: Config, config: str) -> DemoTask:
    """What the demo does with ``cfg``, checked before any work.

    Args:
        cfg (Config): The config as read (its data under
            ``data/shapes/``).
        config (str): Its path, for the message.

    Returns:
        DemoTask: Detection (mmdet) or segmentation (mmseg).

    Raises:
        ValueError: If the config is of another codebase, or reads data
            that is not the shapes.
    """
    scope = cfg.get('default_scope')
    task = TASKS.get(scope)
    if task is None:
        hint = (
            '; the demo pretrains this classifier with --pretrain'
            if scope == 'mmpretrain'
            else ''
        )
        raise ValueError(
            f'--config {config!r} is a {scope or "scope-less"} config; the '
            'demo trains mmdet (detection) and mmseg (segmentation) configs'
            f' on the shapes{hint}'
        )
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        for root in _values_of(cfg.get(loader), 'data_root'):
            if not root.startswith(CONFIG_DATA_ROOT):
                raise ValueError(
                    f'--config {config!r} reads {root!r} ({loader}), not '
                    f'the shapes dataset ({CONFIG_DATA_ROOT}...); the demo '
                    'trains configs on the shapes, as those in '
                    'configs/demo/ do. Train others with tools/train.py'
                )
    return task


def check_model(cfg: Config) -> None:
    """Builds the model of ``cfg`` once, so that a mistake in it (an
    unknown type or argument) is found before any work."""
    build_model(cfg)


def _values_of(node, key: str) -> Iterator[str]:
    """Every string under ``key`` in a nested config."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key and isinstance(value, str):
                yield value
            else:
                yield from _values_of(value, key)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _values_of(value, key)


@contextlib.contextmanager
def kept_whole(out_dir: str) -> Iterator[None]:
    """Leaves ``out_dir`` as it was if the block fails.

    On any failure (an interruption too), what the block created under
    ``out_dir`` is removed, and so is ``out_dir`` itself, with the
    folders above it, if the block created them. Files are written whole
    (atomically) and the demo's results last, so a file that the block
    replaced is either the old one or the new one.

    Args:
        out_dir (str): The results' folder.
    """
    if osp.isdir(out_dir):
        created, before = None, set(_walk(out_dir))
    else:
        created = osp.abspath(out_dir)
        while not osp.lexists(osp.dirname(created)):
            created = osp.dirname(created)
        before = set()
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif osp.isdir(out_dir):
            new = set(_walk(out_dir)) - before
            for path in sorted(new):
                if osp.dirname(path) not in new:
                    _remove(path)
        raise


def _walk(folder: str) -> Iterator[str]:
    for parent, folders, files in os.walk(folder):
        for name in folders + files:
            yield osp.join(parent, name)


def _remove(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif osp.lexists(path):
        os.remove(path)


def check_demo_arguments(
    out_dir: str, data_root: str, tiny: bool, max_iters: int | None
) -> tuple[ShapesSpec, str]:
    """Checks the demo's arguments before any work and picks its data.

    Args:
        out_dir (str): Folder of the results.
        data_root (str): Folder of the shapes dataset.
        tiny (bool): The smoke run: the tiny dataset, in
            ``data/shapes_tiny`` when ``data_root`` is the default.
        max_iters (int, optional): Training iterations.

    Returns:
        tuple[ShapesSpec, str]: The dataset's spec and folder.

    Raises:
        ValueError: If ``max_iters`` is not a positive integer.
        OSError: If ``out_dir`` or ``data_root`` cannot be a folder.
    """
    check_iterations(max_iters)
    spec = TINY_SHAPES if tiny else DEMO_SHAPES
    data_root = osp.normpath(data_root)
    if tiny and data_root == osp.normpath(CONFIG_DATA_ROOT):
        data_root = 'data/shapes_tiny'
    check_folder(out_dir, 'output folder')
    check_folder(data_root, 'data folder')
    return spec, data_root


def check_iterations(value: int | None, name: str = 'max_iters') -> None:
    """Checks an optional iteration count.

    Raises:
        ValueError: If ``value`` is neither None nor a positive integer.
    """
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        raise ValueError(f'{name} must be a positive integer, got {value!r}')


def train_and_evaluate(
    cfg: Config,
    out_dir: str,
    task: DemoTask = DETECTION,
    name: str | None = None,
    steps: tuple[str, str, str] = ('[2/4]', '[3/4]', '[4/4]'),
    num_images: int = 4,
    progress: bool = True,
    title: str | None = None,
) -> DemoResult:
    """Trains and evaluates one config; writes the demo's files.

    Args:
        cfg (Config): A config from :func:`demo_config`; its ``work_dir``
            receives the Runner's log and checkpoint.
        out_dir (str): Folder of ``metrics.json``, ``loss_curve.png`` and
            ``predictions/``.
        task (DemoTask): Detection or segmentation. Defaults to
            detection.
        name (str, optional): What is trained, for the console. Defaults
            to the task's model.
        steps (tuple[str, str, str]): The console's prefixes of the
            training, evaluation and plotting lines. Defaults to the plain
            demo's ``('[2/4]', '[3/4]', '[4/4]')``.
        num_images (int): Validation images to draw. Defaults to 4.
        progress (bool): Print the steps and a progress bar. Defaults to
            True.
        title (str, optional): The loss plot's title. Defaults to the
            task's.

    Returns:
        DemoResult: The evaluation's metrics with ``iterations``,
        ``train_and_eval_seconds``, ``threads`` and ``cpu`` (also written
        to ``metrics.json``), and the files.
    """
    say = print if progress else (lambda *args, **kwargs: None)
    start = time.perf_counter()
    iterations = cfg.train_cfg.max_iters
    say(
        f'{steps[0]} training {name or task.model} for {iterations} '
        f'iterations (batch {cfg.train_dataloader.batch_size}) on the CPU'
    )
    runner, progress_hook = train_quietly(
        cfg,
        progress=progress,
        val_message=f'{steps[1]} {task.evaluation} on the validation split',
    )
    train_seconds = time.perf_counter() - start

    say(f'{steps[2]} plots ...')
    os.makedirs(out_dir, exist_ok=True)
    draw = draw_segmentation if task is SEGMENTATION else draw_predictions
    with _chatter_to_log(runner.logger):
        predictions = osp.join(out_dir, 'predictions')
        with replaced_folder(predictions) as partial:
            drawn = draw(runner, partial, num_images)
        files = dict(
            metrics=osp.join(out_dir, 'metrics.json'),
            loss_curve=plot_losses(
                scalars_file(runner),
                osp.join(out_dir, 'loss_curve.png'),
                title=title or task.title,
            ),
            predictions=[
                osp.join(predictions, osp.basename(path)) for path in drawn
            ],
        )
    metrics = {k: _number(v) for k, v in progress_hook.metrics.items()}
    metrics.update(
        iterations=iterations,
        train_and_eval_seconds=round(train_seconds, 1),
        # Results repeat bit for bit only with the same threads and CPU.
        threads=torch.get_num_threads(),
        cpu=cpu_name(),
    )
    write_json(metrics, files['metrics'])
    return DemoResult(metrics, files)


@contextlib.contextmanager
def replaced_folder(folder: str) -> Iterator[str]:
    """Fills a new folder that replaces ``folder`` when the block ends.

    Yields:
        str: The folder to write into, beside ``folder``; on success it
        takes the place of ``folder`` (whose old content is removed), on
        failure it is removed and ``folder`` is left as it was.
    """
    parent = osp.dirname(osp.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(
        prefix=f'.{osp.basename(folder)}.partial-', dir=parent
    )
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if osp.lexists(folder):
        old = tempfile.mkdtemp(
            prefix=f'.{osp.basename(folder)}.old-', dir=parent
        )
        os.replace(folder, osp.join(old, 'folder'))
    os.replace(partial, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def train_quietly(
    cfg: Config, progress: bool = True, val_message: str | None = None
) -> tuple[Runner, 'ProgressHook']:
    """Builds the Runner of ``cfg`` and trains, showing only progress.

    MMEngine prints its environment, config and every log line at INFO;
    they go to the log file, the console gets the progress bar.

    Args:
        cfg (Config): The config.
        progress (bool): Show the progress bar. Defaults to True.
        val_message (str, optional): Printed when validation starts.

    Returns:
        tuple[Runner, ProgressHook]: The trained runner and the hook that
        holds the last validation metrics.
    """
    console = sys.stdout
    # What MMEngine logs before the Runner has its own logger goes to an
    # earlier one, which writes to the console: only errors, meanwhile.
    with _errors_only(MMLogger.get_current_instance()), holding_warnings():
        with contextlib.redirect_stdout(io.StringIO()):
            runner = build_runner(add_project_hooks(cfg))
    _quiet_console(runner.logger, console)
    log_held_warnings(runner.logger)
    progress_hook = ProgressHook(
        cfg.train_cfg.max_iters,
        enabled=progress,
        out=console,
        val_message=val_message,
    )
    runner.register_hook(progress_hook, 'LOW')
    with _chatter_to_log(runner.logger):
        runner.train()
    return runner, progress_hook


def write_json(payload: dict, path: str) -> str:
    """Writes ``payload`` to ``path`` atomically (indented JSON)."""
    with atomic_path(path) as partial, open(partial, 'w') as file:
        json.dump(payload, file, indent=2)
    return path


def demo_config(
    config: str | Config,
    data_root: str,
    work_dir: str,
    tiny: bool = False,
    max_iters: int | None = None,
    seed: int | None = None,
) -> Config:
    """Loads the demo config, pointed at ``data_root``.

    Every path of the config that starts with ``data/shapes/`` (data roots,
    the evaluator's annotation file) is moved under ``data_root``; see
    :func:`short_run_config`.

    Args:
        config (str | Config): The config, or the config as
            :func:`~mmacmix.apis.load_config` read it (then changed in
            place).
        data_root (str): Where the shapes dataset is.
        work_dir (str): The Runner's work folder.
        tiny (bool): Shrink the run to seconds (see :func:`run_demo`).
        max_iters (int, optional): Training iterations.
        seed (int, optional): The random seed, instead of the config's.

    Returns:
        Config: The config to build the Runner from.
    """
    batches = dict(train_dataloader=2) if tiny else None
    return short_run_config(
        config, data_root, work_dir, max_iters, batches, seed
    )


def short_run_config(
    config: str | Config,
    data_root: str,
    work_dir: str,
    max_iters: int | None = None,
    tiny_batches: dict[str, int] | None = None,
    seed: int | None = None,
) -> Config:
    """Loads one of the demo's configs for a run that evaluates and saves
    once, at its end.

    Every path of the config that starts with ``data/shapes/`` moves under
    ``data_root``; the checkpoint is kept without the optimizer.

    Args:
        config (str | Config): The config, or the config as
            :func:`~mmacmix.apis.load_config` read it (then changed in
            place).
        data_root (str): Where the shapes dataset is.
        work_dir (str): The Runner's work folder.
        max_iters (int, optional): Training iterations (the schedule is
            stretched to them).
        tiny_batches (dict, optional): For a seconds-long run, the batch
            size of each dataloader named (``{'train_dataloader': 2}``);
            such a run takes 2 iterations unless ``max_iters`` says
            otherwise, and logs each.
        seed (int, optional): The random seed, instead of the config's.

    Returns:
        Config: The config to build the Runner from.
    """
    if isinstance(config, Config):
        cfg = config
        cfg.work_dir = work_dir
    else:
        cfg = load_config(config, work_dir=work_dir)
    _replace_prefix(
        cfg._cfg_dict, CONFIG_DATA_ROOT, data_root.rstrip('/') + '/'
    )
    if tiny_batches:
        max_iters = 2 if max_iters is None else max_iters
        for loader, batch_size in tiny_batches.items():
            cfg[loader].batch_size = batch_size
        cfg.default_hooks.logger.interval = 1
        cfg.log_processor.window_size = 1
    if max_iters is not None:
        _rescale_schedule(cfg, max_iters)
    if seed is not None:
        cfg.randomness.seed = seed
    iterations = cfg.train_cfg.max_iters
    cfg.train_cfg.val_interval = iterations
    cfg.default_hooks.checkpoint.interval = iterations
    cfg.default_hooks.checkpoint.save_optimizer = False
    cfg.default_hooks.checkpoint.max_keep_ckpts = 1
    return cfg


def _rescale_schedule(cfg: Config, max_iters: int) -> None:
    """Sets ``max_iters`` and stretches the iteration-based LR schedule to
    it (warm-up and decay keep their share of the run)."""
    ratio = max_iters / cfg.train_cfg.max_iters
    cfg.train_cfg.max_iters = max_iters
    for scheduler in cfg.param_scheduler:
        begin = min(round(scheduler.get('begin', 0) * ratio), max_iters - 1)
        end = round(scheduler.get('end', max_iters) * ratio)
        scheduler.begin = begin
        scheduler.end = max(end, begin + 1)


def _replace_prefix(node, old: str, new: str):
    """Rewrites, in place, every string under ``node`` starting with
    ``old``."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in list(items):
        if isinstance(value, str) and value.startswith(old):
            node[key] = new + value[len(old) :]
        elif isinstance(value, (dict, list)):
            _replace_prefix(value, old, new)


class ProgressHook(Hook):
    """A one-line progress bar with the smoothed loss and the time left.

    On a terminal the line is redrawn in place; otherwise (a log file, CI)
    a line is printed every 10 % so that the output stays short.

    Args:
        total (int): Training iterations.
        enabled (bool): Print anything at all. Defaults to True.
        out (TextIO, optional): The console. Defaults to ``sys.stdout``.
        val_message (str, optional): Printed when validation starts.
            Defaults to the plain demo's COCO evaluation step.
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        out: TextIO | None = None,
        val_message: str | None = (
            '[3/4] COCO evaluation on the validation split'
        ),
    ) -> None:
        self.total = total
        self.val_message = val_message
        self.enabled = enabled
        self.loss = None
        self.start = None
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.printed = -1
        self.metrics: dict = {}

    def before_train(self, runner) -> None:
        self.start = time.perf_counter()

    def before_val(self, runner) -> None:
        if self.enabled and self.val_message:
            print(self.val_message, file=self.out, flush=True)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = dict(metrics or {})

    def after_train_iter(
        self, runner, batch_idx, data_batch=None, outputs=None
    ) -> None:
        if not self.enabled:
            return
        if outputs and 'loss' in outputs:
            value = float(outputs['loss'].detach())
            self.loss = (
                value if self.loss is None else (0.9 * self.loss + 0.1 * value)
            )
        done = runner.iter + 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done)
        width = 30
        filled = round(width * done / self.total)
        line = (
            f'  [{"#" * filled}{"." * (width - filled)}] {done}/{self.total}'
            f'  loss {self.loss:.3f}  elapsed {_clock(elapsed)}'
            f'  left {_clock(left)}'
        )
        if self.tty:
            end = '\n' if done == self.total else ''
            print('\r' + line, end=end, file=self.out, flush=True)
        else:
            decile = 10 * done // self.total
            if decile > self.printed:
                self.printed = decile
                print(line, file=self.out, flush=True)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f'{minutes}:{seconds:02d}'


def _quiet_console(logger: logging.Logger, console: TextIO) -> None:
    """Keeps MMEngine's records (its deprecation warnings too) in the log
    file; the console shows only errors besides the progress."""
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(console)  # it was built while redirected
            handler.setLevel(logging.ERROR)


@contextlib.contextmanager
def _errors_only(logger: logging.Logger) -> Iterator[None]:
    """Lets ``logger``'s console show only errors inside the block."""
    consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    levels = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels):
            handler.setLevel(level)


@contextlib.contextmanager
def _chatter_to_log(logger: logging.Logger) -> Iterator[None]:
    """Sends what libraries print or warn inside the block to the log file.

    pycocotools prints its progress ("loading annotations into
    memory...") and the evaluation tables, and the visualizer warns about
    boxes that leave the image; the log file keeps them at INFO level, which
    the console does not show (see :func:`_quiet_console`).
    """

    class LogLines(io.TextIOBase):
        def write(self, text: str) -> int:
            for line in text.splitlines():
                if line.strip():
                    logger.info(line)
            return len(text)

    def log_warning(message, category, filename, lineno, *args) -> None:
        logger.info(f'{category.__name__}: {message} ({filename}:{lineno})')

    with warnings.catch_warnings(), contextlib.redirect_stdout(LogLines()):
        warnings.showwarning = log_warning
        yield


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        with open('/proc/cpuinfo') as file:
            for line in file:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _number(value):
    return value.item() if hasattr(value, 'item') else value


def scalars_file(runner) -> str:
    """Path of the ``scalars.json`` that ``LocalVisBackend`` writes."""
    return osp.join(runner.log_dir, 'vis_data', 'scalars.json')


def read_scalars(path: str) -> list[dict]:
    """Reads the training records (those with a loss) of ``scalars.json``."""
    records = []
    with open(path) as file:
        for line in file:
            record = json.loads(line)
            if 'loss' in record:
                records.append(record)
    return records


def plot_losses(
    scalars: str,
    out_file: str,
    title: str = PLOT_TITLE,
) -> str:
    """Plots the total loss and its parts against the iteration.

    Args:
        scalars (str): A ``scalars.json`` written during training.
        out_file (str): The PNG to write.
        title (str): The plot's title. Defaults to the demo detector's.

    Returns:
        str: ``out_file``.
    """
    import matplotlib

    matplotlib.use('Agg')  # no display needed
    import matplotlib.pyplot as plt

    records = read_scalars(scalars)
    steps = [r['iter'] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    keys = sorted(k for k in records[0] if k.startswith('loss'))
    for key in keys:
        values = [r.get(key, np.nan) for r in records]
        style = dict(linewidth=2.2) if key == 'loss' else dict(alpha=0.75)
        axis.plot(steps, values, label=key, **style)
    axis.set_xlabel('iteration')
    axis.set_ylabel('loss (window mean)')
    axis.set_yscale('log')
    axis.set_title(title)
    axis.grid(alpha=0.3, which='both')
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    with atomic_path(out_file) as partial:
        figure.savefig(partial, format='png')
    plt.close(figure)
    return out_file


def draw_predictions(
    runner,
    out_dir: str,
    num_images: int,
    scale: int = 3,
    score_thr: float = 0.5,
) -> list[str]:
    """Draws ground truth and predictions of the first validation images.

    Each PNG shows the image enlarged ``scale`` times, ground truth on the
    left and the predicted boxes, classes, scores and masks on the right
    (mmdet's ``DetLocalVisualizer``).

    Args:
        runner (Runner): A runner whose model is trained.
        out_dir (str): Folder of the PNGs.
        num_images (int): How many images.
        scale (int): Enlargement, so that labels stay legible. Defaults
            to 3.
        score_thr (float): Lowest score drawn. Defaults to 0.5.

    Returns:
        list[str]: The PNG paths.
    """
    from mmdet.structures.mask import BitmapMasks

    def enlarge(sample, height: int, width: int) -> None:
        pred = sample.pred_instances
        pred = pred[pred.scores >= score_thr]
        pred.bboxes = pred.bboxes * scale
        pred.masks = _upscale_masks(pred.masks, scale)
        sample.pred_instances = pred
        gt = sample.gt_instances
        boxes = gt.bboxes
        gt.bboxes = getattr(boxes, 'tensor', boxes) * scale
        gt.masks = BitmapMasks(gt.masks.to_ndarray(), height, width).rescale(
            scale, 'nearest'
        )

    return _draw_validation(
        runner, out_dir, num_images, scale, enlarge, pred_score_thr=score_thr
    )


def draw_segmentation(
    runner, out_dir: str, num_images: int, scale: int = 3
) -> list[str]:
    """Draws the ground truth and predicted classes of the first
    validation images.

    Each PNG shows the image enlarged ``scale`` times with every pixel
    coloured by its class (the dataset's palette, class names on the
    regions; mmseg's ``SegLocalVisualizer``): ground truth left,
    prediction right.

    Args:
        runner (Runner): A runner whose segmentor is trained.
        out_dir (str): Folder of the PNGs.
        num_images (int): How many images.
        scale (int): Enlargement, so that labels stay legible. Defaults
            to 3.

    Returns:
        list[str]: The PNG paths.
    """
    from mmengine.structures import PixelData

    def enlarge(sample, height: int, width: int) -> None:
        for key in ('gt_sem_seg', 'pred_sem_seg'):
            labels = sample.get(key).data.repeat_interleave(scale, -2)
            sample.set_field(
                PixelData(data=labels.repeat_interleave(scale, -1)),
                key,
                dtype=PixelData,
            )

    return _draw_validation(runner, out_dir, num_images, scale, enlarge)


def _draw_validation(
    runner, out_dir: str, num_images: int, scale: int, enlarge, **options
) -> list[str]:
    """Predicts the first validation images and draws each, enlarged
    ``scale`` times, with the runner's visualizer (ground truth and
    prediction side by side).

    Args:
        enlarge (callable): ``enlarge(sample, height, width)`` scales the
            sample's ground truth and prediction to the enlarged image.
        options: More arguments of the visualizer's ``add_datasample``.

    Returns:
        list[str]: The PNG paths.
    """
    import cv2

    os.makedirs(out_dir, exist_ok=True)
    dataset = runner.test_dataloader.dataset
    visualizer = runner.visualizer
    visualizer.dataset_meta = dataset.metainfo  # classes and palette
    model = runner.model
    model.eval()
    paths = []
    collate = runner.test_dataloader.collate_fn
    for index in range(min(num_images, len(dataset))):
        batch = collate([dataset[index]])
        with torch.no_grad():
            [sample] = model.test_step(batch)
        image = cv2.imread(sample.img_path)[..., ::-1]
        height, width = image.shape[:2]
        image = cv2.resize(
            image,
            (width * scale, height * scale),
            interpolation=cv2.INTER_NEAREST,
        )
        enlarge(sample, height, width)
        name = osp.splitext(osp.basename(sample.img_path))[0]
        path = osp.join(out_dir, f'{name}.png')
        visualizer.add_datasample(
            osp.basename(path),
            image,
            sample,
            draw_gt=True,
            draw_pred=True,
            out_file=path,
            **options,
        )
        paths.append(path)
    return paths


def _upscale_masks(masks: torch.Tensor, scale: int) -> torch.Tensor:
    if len(masks) == 0:
        height, width = masks.shape[-2:]
        return masks.new_zeros((0, height * scale, width * scale))
    return (
        masks.float()[:, None]
        .repeat_interleave(scale, 2)
        .repeat_interleave(scale, 3)[:, 0]
        .bool()
    )
