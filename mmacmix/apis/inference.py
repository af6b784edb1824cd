"""Running a trained detector or segmentor on image files.

``tools/infer.py`` is a thin command line over :func:`infer`. The work is
done by mmdet's ``DetInferencer`` or mmseg's ``MMSegInferencer``, chosen by
the config's ``default_scope``, and the output follows their layout::

    OUT_DIR/vis/NAME.jpg     the image with its predictions drawn
    OUT_DIR/preds/STEM.json  detection: labels, scores, boxes (x1, y1,
                             x2, y2 in pixels of the image) and masks
                             (COCO run-length encoding), as mmdet writes
    OUT_DIR/preds/STEM.png   segmentation: the class index of every pixel

What this module adds to the two inferencers, for configs and checkpoints
of this project:

* Everything is checked before anything is written: the inputs (files or
  folders of images), the output folder, the device, the config's scope
  and the checkpoint, which must fit the config's model exactly (the
  inferencers load whatever fits and predict with random weights for the
  rest).
* The checkpoint is read by :func:`mmacmix.checkpoint.read_checkpoint`
  with ``weights_only=True`` (a Runner checkpoint loads with exactly the
  globals it needs allowed, for that read only), not by MMEngine's loader.
* Class names come from the checkpoint's ``dataset_meta``, else from the
  config's test dataset (mmdet falls back to COCO's and mmseg to
  Cityscapes' classes).
* ``LoadAnnotations`` is dropped from the test pipeline: images come
  without annotations (mmseg drops it, mmdet keeps it).
* Segmentation predictions are written as ``preds/STEM.png``, named after
  the image as mmdet names its JSON files (mmseg numbers them,
  ``pred/00000000_pred.png``, from 0 in every call).
* Every file is written under a temporary name and then renamed, so an
  interrupted run never leaves half a file.
"""

import contextlib
import copy
import io
import json
import logging
import os
import os.path as osp
import shlex
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

from mmacmix.checkpoint import (
    load_weights,
    read_checkpoint,
    state_dict_of,
)
from mmacmix.cli import holding_warnings
from mmacmix.fileio import atomic_path, check_folder

from .runner import build_model, load_config

__all__ = [
    'IMAGE_SUFFIXES',
    'InferenceResult',
    'build_inferencer',
    'load_inference_config',
    'collect_images',
    'infer',
    'infer_command',
    'infer_command_after_training',
]

# The image files a folder is searched for, as mmdet's DetInferencer does.
IMAGE_SUFFIXES = (
    '.jpg',
    '.jpeg',
    '.png',
    '.ppm',
    '.bmp',
    '.pgm',
    '.tif',
    '.tiff',
    '.webp',
)
TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation'}


@dataclass
class InferenceResult:
    """What :func:`infer` wrote.

    Attributes:
        task (str): ``'detection'`` or ``'segmentation'``.
        images (list[str]): The input images, in the order they ran.
        preds (list[str]): The prediction files, one per image.
        vis (list[str]): The drawn images, one per image.
    """

    task: str
    images: list[str] = field(default_factory=list)
    preds: list[str] = field(default_factory=list)
    vis: list[str] = field(default_factory=list)


def collect_images(inputs: Sequence[str]) -> list[str]:
    """Lists the images to run on: files as given, folders' images sorted.

    Folders are searched one level deep for :data:`IMAGE_SUFFIXES`, as
    mmdet's inferencer does. A file given twice runs once.

    Args:
        inputs (Sequence[str]): Image files and folders of images.

    Returns:
        list[str]: The image paths.

    Raises:
        ValueError: If there are no inputs, a file is no image (by its
            name or its content), a folder holds none, or two images would
            write the same output files.
        FileNotFoundError: If an input does not exist.
    """
    if not inputs:
        raise ValueError('no input given; expected image files or folders')
    images: list[str] = []
    for path in inputs:
        if osp.isdir(path):
            found = sorted(
                osp.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_SUFFIXES)
                and osp.isfile(osp.join(path, name))
            )
            if not found:
                raise ValueError(
                    f'input folder {path!r} holds no images; expected files '
                    f'ending in {", ".join(IMAGE_SUFFIXES)}'
                )
            images.extend(found)
        elif osp.isfile(path):
            if not path.lower().endswith(IMAGE_SUFFIXES):
                raise ValueError(
                    f'input {path!r} is not an image file; expected a name '
                    f'ending in {", ".join(IMAGE_SUFFIXES)}, or a folder'
                )
            images.append(path)
        else:
            raise FileNotFoundError(
                f'input {path!r} does not exist; expected an image file or '
                'a folder of images'
            )
    unique: dict[str, str] = {}
    by_stem: dict[str, str] = {}
    for image in images:
        real = osp.realpath(image)
        if real in unique:
            continue
        stem = osp.splitext(osp.basename(image))[0]
        if stem in by_stem:
            raise ValueError(
                f'inputs {by_stem[stem]!r} and {image!r} would write the same '
                f'output files (preds/{stem}.*); run them separately, each '
                'with its own --out-dir'
            )
        if not cv2.haveImageReader(image):
            raise ValueError(
                f'input {image!r} is not a readable image (its content is in '
                'no format OpenCV decodes); expected a JPEG, PNG, ... file'
            )
        unique[real] = by_stem[stem] = image
    return list(unique.values())


def check_device(device: str | None) -> str:
    """Returns the device to run on: ``device``, else CUDA if present.

    Raises:
        ValueError: If ``device`` is no device name, or names a CUDA device
            this machine does not have.
    """
    if device is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {device!r} is not a device; expected 'cpu', 'cuda' "
            "or 'cuda:N'"
        ) from error
    if parsed.type not in ('cpu', 'cuda'):
        raise ValueError(
            f"--device {device!r} is not supported; expected 'cpu', 'cuda' "
            "or 'cuda:N'"
        )
    if parsed.type == 'cuda':
        count = torch.cuda.device_count()
        if (parsed.index or 0) >= count:
            raise ValueError(
                f'--device {device!r}: this machine has '
                f'{count or "no"} CUDA device{"" if count == 1 else "s"}; '
                'use --device cpu'
                + (f' or cuda:0 to cuda:{count - 1}' if count > 1 else '')
            )
    return device


def infer(
    config: str,
    checkpoint: str,
    inputs: Sequence[str],
    out_dir: str,
    device: str | None = None,
    score_thr: float | None = None,
    cfg_options: dict | None = None,
    progress: bool = True,
    trust: bool = False,
) -> InferenceResult:
    """Runs the model of ``config`` with ``checkpoint`` on images.

    Args:
        config (str): An mmdet or mmseg config of this project.
        checkpoint (str): A checkpoint that fits the config's model, e.g.
            one written by ``tools/train.py``.
        inputs (Sequence[str]): Image files and folders of images.
        out_dir (str): Where ``vis/`` and ``preds/`` are written (created
            if absent; files of the same names are replaced).
        device (str, optional): ``'cpu'``, ``'cuda'`` or ``'cuda:N'``;
            defaults to CUDA if present, else the CPU.
        score_thr (float, optional): Detection only: the least score of a
            box or mask drawn in ``vis/`` (``preds/`` keeps every
            prediction, as mmdet's inferencer does). Defaults to 0.3.
        cfg_options (dict, optional): Config overrides, merged last (e.g.
            ``{'model.backbone.deploy': True}`` for a re-parameterised
            X-volution).
        progress (bool): Show a progress bar when there are several
            images. Defaults to True.
        trust (bool): Read a checkpoint that holds more than weights
            (``weights_only=False``): only a file you trust. Defaults to
            False.

    Returns:
        InferenceResult: The files written.

    Raises:
        OSError: If an input is missing or ``out_dir`` cannot be a folder.
        ValueError: If an input is no image, a folder holds none, the
            device or ``score_thr`` is invalid, the config is neither a
            detection nor a segmentation config, or the checkpoint cannot
            be read.
        KeyMismatchError: If the checkpoint does not fit the model.
    """
    images = collect_images(inputs)
    check_folder(out_dir)
    if score_thr is not None and not 0.0 <= score_thr <= 1.0:
        raise ValueError(f'--score-thr must lie in [0, 1], got {score_thr!r}')
    device = check_device(device)
    cfg = load_inference_config(config, cfg_options)
    task = TASKS[cfg.default_scope]
    if score_thr is not None and task != 'detection':
        raise ValueError(
            '--score-thr applies to detection configs only; '
            f'{config!r} is a {task} config'
        )
    inferencer = build_inferencer(cfg, checkpoint, device, trust)
    result = InferenceResult(task=inferencer.task)
    for image in _track(images, progress and len(images) > 1):
        pred, picture = inferencer.run_one(
            image, 0.3 if score_thr is None else score_thr
        )
        result.images.append(image)
        result.preds.append(
            _write(pred, osp.join(out_dir, 'preds'), image, inferencer.task)
        )
        result.vis.append(_write_picture(picture, out_dir, image))
    return result


def load_inference_config(
    config: str, cfg_options: dict | None = None
) -> Config:
    """Reads a detection or segmentation config and fits it for images
    without annotations.

    Args:
        config (str): An mmdet or mmseg config.
        cfg_options (dict, optional): Config overrides, merged last.

    Raises:
        FileNotFoundError: If ``config`` does not exist.
        ValueError: If its ``default_scope`` is neither mmdet nor mmseg.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'config {config!r} does not exist')
    cfg = load_config(config, cfg_options=cfg_options)
    scope = cfg.get('default_scope')
    if scope not in TASKS:
        raise ValueError(
            f'config {config!r} has default_scope {scope!r}; tools/infer.py '
            "runs detection ('mmdet') and segmentation ('mmseg') configs"
        )
    # No annotations to load; no visualizer backends (infer() writes the
    # pictures itself, atomically).
    pipeline = cfg.test_dataloader.dataset.pipeline
    cfg.test_dataloader.dataset.pipeline = [
        step for step in pipeline if step.get('type') != 'LoadAnnotations'
    ]
    if cfg.get('visualizer') is not None:
        cfg.visualizer.vis_backends = None
    return cfg


def build_inferencer(
    cfg: Config, checkpoint: str, device: str = 'cpu', trust: bool = False
):
    """Builds the inferencer of a config, its checkpoint read and checked.

    Args:
        cfg (Config): A config from :func:`load_inference_config`.
        checkpoint (str): A checkpoint that fits the config's model.
        device (str): Where the model runs. Defaults to ``'cpu'``.
        trust (bool): Read a checkpoint that holds more than weights
            (``weights_only=False``). Defaults to False.

    Returns:
        A subclass of mmdet's ``DetInferencer`` or mmseg's
        ``MMSegInferencer`` with ``task`` and ``run_one(image, score_thr)``.

    Raises:
        OSError: If the checkpoint is missing.
        ValueError: If the checkpoint cannot be read.
        KeyMismatchError: If it does not fit the model.
    """
    weights = read_checkpoint(checkpoint, trust=trust)
    state_dict_of(weights, checkpoint)  # a clear error if it holds none
    inferencer_class = _inferencer_class(cfg.default_scope)
    # mmdet's and mmseg's modules warn about their own deprecated calls
    # while the model is built: held back, as the other commands do.
    with _quiet_mmengine(), holding_warnings():
        return inferencer_class(cfg, weights, checkpoint, device)


def infer_command(
    config: str, checkpoint: str, image: str, out_dir: str
) -> str:
    """The ``tools/infer.py`` command line that runs a checkpoint on an
    image, quoted for a POSIX shell (the demo prints it)."""
    tool = _infer_tool()
    words = [tool, config, checkpoint, image, '--out-dir', out_dir]
    return 'python ' + ' '.join(shlex.quote(word) for word in words)


def infer_command_after_training(cfg: Config, out_dir: str) -> str:
    """The command that runs a finished training run's last checkpoint
    on the first image of its test split (the demo prints it).

    Args:
        cfg (Config): The config the Runner trained: its ``work_dir``
            holds the config copy and ``last_checkpoint``.
        out_dir (str): The run's output folder; the command writes into its
            ``infer/``.
    """
    work_dir = cfg.work_dir
    config = osp.join(work_dir, osp.basename(cfg.filename))
    with open(osp.join(work_dir, 'last_checkpoint')) as file:
        checkpoint = file.read().strip()
    dataset = cfg.test_dataloader.dataset
    prefix = dataset.get('data_prefix') or {}
    folder = osp.join(
        dataset.get('data_root') or '',
        prefix.get('img') or prefix.get('img_path') or '',
    )
    image = collect_images([folder])[0]
    return infer_command(config, checkpoint, image, osp.join(out_dir, 'infer'))


def _infer_tool() -> str:
    """Path of tools/infer.py, relative to the working folder if inside."""
    from mmacmix.configs import config_root

    tool = osp.join(osp.dirname(str(config_root())), 'tools', 'infer.py')
    relative = osp.relpath(tool)
    return tool if relative.startswith('..') else relative


def _dataset_meta(cfg: Config, checkpoint: Mapping) -> dict:
    """Class names (and palette) of the model: from the checkpoint's
    ``meta``, else from the config's test dataset."""
    meta = checkpoint.get('meta')
    if isinstance(meta, Mapping) and isinstance(
        meta.get('dataset_meta'), Mapping
    ):
        return {k.lower(): v for k, v in meta['dataset_meta'].items()}
    from mmengine.registry import DATASETS

    dataset = copy.deepcopy(cfg.test_dataloader.dataset)
    dataset['lazy_init'] = True  # the class names only: no annotations read
    return dict(DATASETS.build(dataset).metainfo)


def _inferencer_class(scope: str) -> type:
    """The inferencer of ``scope`` with this project's checks added."""
    if scope == 'mmdet':
        from mmdet.apis import DetInferencer as base
    else:
        from mmseg.apis import MMSegInferencer as base

    class Inferencer(base):
        task = TASKS[scope]

        def __init__(
            self, cfg: Config, checkpoint: Mapping, source: str, device: str
        ) -> None:
            self._checkpoint = checkpoint
            self._source = source
            super().__init__(model=cfg, weights=None, device=device)

        def _init_model(self, cfg: Config, weights, device: str):
            # weights=None above: the checkpoint was read (and checked) by
            # mmacmix, not by MMEngine's loader; the model is built by the
            # one builder of mmacmix.
            model = build_model(cfg)
            model.cfg = cfg
            self._load_weights_to_model(model, self._checkpoint, cfg)
            return model.to(device).eval()

        def _load_weights_to_model(self, model, checkpoint, cfg) -> None:
            load_weights(model, checkpoint, repr(self._source))
            meta = dict(checkpoint.get('meta') or {})
            meta['dataset_meta'] = _dataset_meta(cfg, checkpoint)
            # The parent reads the class names and palette from the meta
            # (it loads the same weights once more, without effect).
            super()._load_weights_to_model(
                model, {**checkpoint, 'meta': meta}, cfg
            )

        def run_one(self, image: str, score_thr: float):
            """Predicts and draws one image file.

            Returns:
                tuple: The prediction (a dict as mmdet's JSON files hold
                it for detection, a 2-D array of class indices for
                segmentation) and the drawn image (RGB).
            """
            data = self.collate_fn([self.pipeline(image)])
            (sample,) = self.forward(data)
            options = dict(return_vis=True, img_out_dir='')
            if self.task == 'detection':
                options['pred_score_thr'] = score_thr
                pred = self.pred2dict(sample, '')
            else:
                pred = sample.pred_sem_seg.data[0].cpu().numpy()
            (picture,) = self.visualize([image], [sample], **options)
            return pred, picture

    Inferencer.__name__ = Inferencer.__qualname__ = f'MMACmix{base.__name__}'
    return Inferencer


@contextlib.contextmanager
def _quiet_mmengine() -> Iterator[None]:
    """Hides MMEngine's warnings inside the block.

    Building an inferencer warns that mmdet has no ``function`` registry
    (it then uses MMEngine's, which is right): noise for a user.
    """
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _track(images: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return images
    from rich.console import Console
    from rich.progress import track

    return track(
        images, description='Inference', console=Console(file=sys.stderr)
    )


def _write(pred, folder: str, image: str, task: str) -> str:
    """Writes one prediction: JSON (detection) or a label PNG."""
    stem = osp.splitext(osp.basename(image))[0]
    if task == 'detection':
        path = osp.join(folder, stem + '.json')
        payload = json.dumps(pred).encode()
    else:
        path = osp.join(folder, stem + '.png')
        payload = _label_png(pred)
    with atomic_path(path) as partial, open(partial, 'wb') as file:
        file.write(payload)
    return path


def _label_png(labels: np.ndarray) -> bytes:
    from PIL import Image

    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    buffer = io.BytesIO()
    Image.fromarray(labels.astype(dtype)).save(buffer, format='PNG')
    return buffer.getvalue()


def _write_picture(picture: np.ndarray, out_dir: str, image: str) -> str:
    """Writes a drawn image (RGB) as ``vis/NAME``, in the input's format
    (PNG for a grey-only ``.pgm``)."""
    stem, suffix = osp.splitext(osp.basename(image))
    if suffix.lower() == '.pgm':
        suffix = '.png'
    path = osp.join(out_dir, 'vis', stem + suffix)
    ok, encoded = cv2.imencode(
        suffix, np.ascontiguousarray(picture[..., ::-1])
    )
    if not ok:
        raise OSError(f'could not encode the drawn image {path!r}')
    with atomic_path(path) as partial, open(partial, 'wb') as file:
        file.write(encoded.tobytes())
    return path
