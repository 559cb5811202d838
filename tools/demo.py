#!/usr/bin/env python
"""The project's main job on a small default: train and test PoolFormer-S12 detectors and
segmentors from scratch on the synthetic toy sets, through tools/train.py and tools/test.py.

    python tools/demo.py [--task det seg] [--work-root work_dirs/demo]

Prints the metrics, how many detection pictures name every shape right, and where the pictures
and training curves are.
"""
import argparse
import glob
import json
import os
import os.path as osp
import pickle
import re
import resource
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

JOBS = {
    'det': dict(kind='coco', data_root='data/toy_coco',
                config='configs/detection/toy/retinanet_poolformer_s12_toy.py',
                eval=['bbox'], checkpoint_prefix='epoch'),
    'seg': dict(kind='ade', data_root='data/toy_ade',
                config='configs/segmentation/toy/fpn_poolformer_s12_toy.py',
                eval=['mIoU'], checkpoint_prefix='iter'),
}

# The first line of a message from mmengine's logger.
LOG_LINE = re.compile(r'^\d\d/\d\d \d\d:\d\d:\d\d - mmengine - [A-Z]+ - (.*)$')
# Long log messages (and the environment: an empty first line), left in the work dir's log file.
QUIET_BLOCKS = ('Config:', 'Hooks will be executed in the following order')


def run(cmd):
    """Run ``python cmd...`` in the repository, passing its output through as it comes, less
    the config and environment dumps. Returns the whole output; exits if the command fails."""
    print('$ python ' + ' '.join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    process = subprocess.Popen([sys.executable] + cmd, cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    lines, hidden, quiet = [], [], False
    for line in process.stdout:
        lines.append(line)
        message = LOG_LINE.match(line)
        if message:
            text = message.group(1).strip()
            quiet = not text or text.startswith(QUIET_BLOCKS)
        elif line.startswith('Traceback'):
            quiet = False
        if quiet:
            hidden.append(line)
        else:
            hidden = []
            print(line, end='', flush=True)
    returncode = process.wait()
    if returncode != 0:
        # an error message printed inside a hidden block (after the config dump) still shows
        sys.stdout.write(''.join(hidden[-40:]))
        raise SystemExit(f'demo: command failed with exit code {returncode}:\n'
                         f'  python {" ".join(cmd)}')
    return ''.join(lines)


def last_checkpoint(work_dir, prefix):
    """The checkpoint the training wrote last (epoch_N.pth / iter_N.pth with the largest N)."""
    found = glob.glob(osp.join(REPO, work_dir, f'{prefix}_*.pth'))
    if not found:
        raise SystemExit(f'demo: the training wrote no {prefix}_*.pth in {work_dir}')
    return max(found, key=lambda p: int(re.findall(r'_(\d+)\.pth$', p)[0]))


def minutes(seconds):
    return f'{int(seconds // 60)} min {seconds % 60:02.0f} s'


def run_job(task, work_root):
    job = JOBS[task]
    # Written every time (it takes a second), so data of an older generator are not trained on.
    run(['tools/dataset_converters/make_toy_data.py', job['kind'], job['data_root']])
    work_dir = osp.join(work_root, task)
    run(['tools/train.py', job['config'], '--work-dir', work_dir])
    curves = osp.join(work_dir, 'curves.png')
    run(['tools/analysis/plot_logs.py', work_dir, '--out', curves])

    show_dir = osp.join(work_dir, 'pictures')
    test = ['tools/test.py', job['config'], last_checkpoint(work_dir, job['checkpoint_prefix']),
            '--work-dir', work_dir, '--eval', *job['eval'], '--show-dir', show_dir]
    if task == 'det':
        predictions = osp.join(work_dir, 'predictions.pkl')
        test += ['--out', predictions]
    out = run(test)
    metrics = json.loads(out.rsplit('Test metrics: ', 1)[1].splitlines()[0])
    # older layouts nest mmseg's pictures (vis_data/vis_image/)
    pictures = (sorted(glob.glob(osp.join(REPO, show_dir, '*.png')))
                or sorted(glob.glob(osp.join(REPO, show_dir, '**', '*.png'), recursive=True)))
    where = osp.relpath(osp.dirname(pictures[0]), REPO) if pictures else show_dir
    if task == 'det':
        from mmengine.config import Config

        from poolformer_mm.analysis.named_right import pictures_named_right
        cfg = Config.fromfile(osp.join(REPO, job['config']), import_custom_modules=False)
        threshold = cfg.default_hooks.visualization.score_thr  # that of the pictures
        with open(osp.join(REPO, predictions), 'rb') as f:
            results = pickle.load(f)
        right = sum(pictures_named_right(
            results, osp.join(REPO, job['data_root'], 'annotations', 'instances_val2017.json'),
            threshold, cfg.test_dataloader.dataset.metainfo['classes']))
        result = (f"bbox mAP {metrics['coco/bbox_mAP']:.3f}, "
                  f"mAP50 {metrics['coco/bbox_mAP_50']:.3f}; {right} of {len(results)} "
                  f'pictures name every shape right (one box per shape, of its class, score >= '
                  f'{threshold})')
    else:
        result = f"mIoU {metrics['mIoU']:.2f}, aAcc {metrics['aAcc']:.2f}"
    return [f"{job['config']}:", f'  {result}',
            f'  {len(pictures)} pictures in {where}/ (left: ground truth, right: prediction)',
            f'  training curves in {curves}']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', nargs='+', choices=sorted(JOBS), default=['det', 'seg'])
    parser.add_argument('--work-root', default='work_dirs/demo')
    args = parser.parse_args()

    start = time.perf_counter()
    summary = []
    for task in args.task:
        task_start = time.perf_counter()
        summary += run_job(task, args.work_root)
        summary.append(f'  ({minutes(time.perf_counter() - task_start)})')
        print('\n'.join(summary[-5:]), flush=True)
    took = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print('\n'.join(['', 'Demo finished:'] + summary + [
        f'Took {minutes(took)} (CPU time of its processes: '
        f'{minutes(usage.ru_utime + usage.ru_stime)} on {os.cpu_count()} cores).']))


if __name__ == '__main__':
    main()
