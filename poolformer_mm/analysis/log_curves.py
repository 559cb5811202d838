"""Loss and metric curves from the json logs of mmengine's runner (``tools/analysis/plot_logs.py``).

``<work_dir>/<timestamp>/vis_data/<timestamp>.json`` holds one json object per line: training
lines at the global ``iter``, validation lines at ``step`` (the epoch, or the iteration in
iteration-based runs).
"""
import json
import os
import os.path as osp
import re
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import List, Optional, Sequence, Tuple

from ..utils.errors import InputNotFoundError, InvalidInputError

# Drawn when no keys are given, each where the log has it.
DEFAULT_KEYS = ('loss', 'mIoU', 'aAcc', 'coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP')
_POSITION_KEYS = ('iter', 'epoch', 'step')
_RUN_FOLDER = re.compile(r'^\d{8}_\d{6}$')


@dataclass
class TrainingLog:
    """The lines of one json log, split into training and validation lines."""
    path: str
    train: List[dict] = field(default_factory=list)
    val: List[dict] = field(default_factory=list)

    def keys(self, phase: str) -> List[str]:
        """The numeric keys of the ``'train'`` or ``'val'`` lines, in order of appearance."""
        lines = getattr(self, phase)
        return list(dict.fromkeys(key for line in lines for key, value in line.items()
                                  if key not in _POSITION_KEYS and _is_number(value)))

    @property
    def by_epoch(self) -> bool:
        """Whether the validation ``step`` counts epochs rather than iterations."""
        epochs = [line['epoch'] for line in self.train if 'epoch' in line]
        steps = [line['step'] for line in self.val if 'step' in line]
        return bool(epochs) and (not steps or max(steps) <= max(epochs))


@dataclass
class Curve:
    """One key of one run: ``y`` against ``x`` (iterations, or epochs for ``x_label='epoch'``)."""
    run: str
    key: str
    phase: str
    x_label: str
    x: List[float]
    y: List[float]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_json_log(work_dir: str) -> str:
    """The json log of the newest run in ``work_dir`` that trained (``work_dir`` itself if it
    is a file); :class:`InputNotFoundError` if there is none."""
    if osp.isfile(work_dir):
        return work_dir
    if not osp.isdir(work_dir):
        raise InputNotFoundError(f"work dir '{work_dir}' not found: pass the --work-dir of a "
                                 'training run (default: work_dirs/<config name>)')
    runs = sorted((name for name in os.listdir(work_dir) if _RUN_FOLDER.match(name)),
                  reverse=True)
    logs = [osp.join(work_dir, run, 'vis_data', name) for run in runs
            for name in (run + '.json', 'scalars.json')]
    logs = [log for log in logs if osp.isfile(log)]
    if not logs:
        raise InputNotFoundError(
            f"no json log in work dir '{work_dir}': expected "
            '<timestamp>/vis_data/<timestamp>.json (or scalars.json) there, which tools/train.py '
            'writes as it trains. Pass the work dir of a training run, or the json file itself.')
    return next((log for log in logs if read_json_log(log).train), logs[0])


def read_json_log(path: str) -> TrainingLog:
    """Split a json log into training lines (those with ``iter``) and validation lines; a last
    line cut short (a run still writing) is left out."""
    log = TrainingLog(path)
    with open(path, encoding='utf-8') as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    for number, text in enumerate(lines, 1):
        try:
            line = json.loads(text)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise InvalidInputError(f"line {number} of '{path}' is not json ({err}); is it an "
                                    'mmengine json log (vis_data/<timestamp>.json)?') from None
        if not isinstance(line, dict):
            continue
        (log.train if 'iter' in line else log.val).append(line)
    return log


def _resolve_key(key: str, log: TrainingLog) -> Tuple[str, str]:
    """``(phase, key as logged)``; ``bbox_mAP`` also finds ``coco/bbox_mAP``, ``loss_ce``
    ``decode.loss_ce``."""
    for phase in ('train', 'val'):
        keys = log.keys(phase)
        if key in keys:
            return phase, key
        suffixed = [k for k in keys if k.endswith(('/' + key, '.' + key))]
        if len(suffixed) == 1:
            return phase, suffixed[0]
    raise InvalidInputError(
        f"key '{key}' is not in the log '{log.path}'. Its keys are: training: "
        f"{', '.join(log.keys('train')) or 'none'}; validation: "
        f"{', '.join(log.keys('val')) or 'none (no validation yet)'}")


def extract_curves(log: TrainingLog, keys: Optional[Sequence[str]] = None,
                   run: str = '') -> List[Curve]:
    """The curves of ``keys`` in ``log`` (default: those of :data:`DEFAULT_KEYS` it has)."""
    if not log.train and not log.val:
        raise InvalidInputError(f"the log '{log.path}' has no lines yet: wait for the first "
                                'logging interval of the run')
    if keys is None:
        present = set(log.keys('train')) | set(log.keys('val'))
        keys = [key for key in DEFAULT_KEYS if key in present]
    curves = []
    for key in keys:
        phase, logged = _resolve_key(key, log)
        position = 'iter' if phase == 'train' else 'step'
        x_label = 'epoch' if phase == 'val' and log.by_epoch else 'iteration'
        points = [(line[position], line[logged]) for line in getattr(log, phase)
                  if _is_number(line.get(logged)) and position in line]
        curves.append(Curve(run, logged, phase, x_label, [p[0] for p in points],
                            [p[1] for p in points]))
    return curves


def plot_curves(curves: Sequence[Curve], out: str, title: Optional[str] = None) -> str:
    """Draw ``curves`` to the image file ``out``, one panel per x axis; return ``out``."""
    # A Figure of its own, not pyplot: no window, no global backend switched.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    # training ('train' < 'val') first, then validation by epoch, then by iteration
    panel_of = attrgetter('phase', 'x_label')
    panels = [list(panel) for _, panel in groupby(sorted(curves, key=panel_of), panel_of)]
    figure = Figure(figsize=(6.4 * len(panels), 4.8), layout='constrained')
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for curve in panel:
            label = f'{curve.run}: {curve.key}' if curve.run else curve.key
            ax.plot(curve.x, curve.y, marker='o' if len(curve.x) < 30 else None,
                    markersize=3, label=label)
        ax.set_xlabel(panel[0].x_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title('training' if panel[0].phase == 'train' else 'validation')
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    figure.savefig(out, dpi=100)
    return out


def plot_work_dirs(work_dirs: Sequence[str], keys: Optional[Sequence[str]] = None,
                   out: Optional[str] = None, legend: Optional[Sequence[str]] = None,
                   title: Optional[str] = None) -> Tuple[str, List[Curve]]:
    """Plot ``keys`` of the newest run of each work dir (or json log) to the PNG ``out``
    (default ``<first work dir>/curves.png``), each run's keys named after its ``legend`` entry
    (default: the work dir's name when there are several); returns ``(out, curves)``."""
    if legend is not None and len(legend) != len(work_dirs):
        raise InvalidInputError(f'--legend needs one name per work dir: got {len(legend)} '
                                f'names for {len(work_dirs)} work dirs')
    if legend is None:
        legend = [osp.basename(osp.normpath(d)) if len(work_dirs) > 1 else '' for d in work_dirs]
    curves = [curve for work_dir, run in zip(work_dirs, legend)
              for curve in extract_curves(read_json_log(find_json_log(work_dir)), keys, run)]
    if not curves:
        raise InvalidInputError(
            f"none of the default keys ({', '.join(DEFAULT_KEYS)}) is in the logs of "
            f"{', '.join(work_dirs)}: name the keys to draw with --keys")
    if out is None:
        first = work_dirs[0]
        out = osp.join(osp.dirname(first) if osp.isfile(first) else first, 'curves.png')
    return plot_curves(curves, out, title), curves
