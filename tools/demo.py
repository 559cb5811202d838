#!/usr/bin/env python
"""The project's main job on a small default: train and test PoolFormer-S12 detectors and
segmentors from scratch on the synthetic toy sets, through tools/train.py and tools/test.py.

    python tools/demo.py [--task det seg] [--work-root work_dirs/demo]

Makes the toy data if missing, trains the toy RetinaNet (and Semantic FPN), tests each with the
old-style --eval flag, writes pictures with --show-dir, and prints the metrics and where the
pictures are. Takes a few minutes on a 2-core CPU.
"""
import argparse
import glob
import json
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

JOBS = {
    'det': dict(kind='coco', data_root='data/toy_coco',
                config='configs/detection/toy/retinanet_poolformer_s12_toy.py',
                checkpoint='epoch_20.pth', eval=['bbox'], metric='coco/bbox_mAP'),
    'seg': dict(kind='ade', data_root='data/toy_ade',
                config='configs/segmentation/toy/fpn_poolformer_s12_toy.py',
                checkpoint='iter_240.pth', eval=['mIoU'], metric='mIoU'),
}


def run(cmd):
    print('$ ' + ' '.join(cmd), flush=True)
    result = subprocess.run([sys.executable] + cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-4000:])
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f'command failed with exit code {result.returncode}')
    return result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', nargs='+', choices=sorted(JOBS), default=['det', 'seg'])
    parser.add_argument('--work-root', default='work_dirs/demo')
    args = parser.parse_args()

    summary = []
    for task in args.task:
        job = JOBS[task]
        start = time.perf_counter()
        if not osp.isdir(osp.join(REPO, job['data_root'])):
            run(['tools/dataset_converters/make_toy_data.py', job['kind'], job['data_root']])
        work_dir = osp.join(args.work_root, task)
        run(['tools/train.py', job['config'], '--work-dir', work_dir])
        show_dir = osp.join(work_dir, 'pictures')
        out = run(['tools/test.py', job['config'], osp.join(work_dir, job['checkpoint']),
                   '--work-dir', work_dir, '--eval', *job['eval'], '--show-dir', show_dir])
        metrics = json.loads(out.rsplit('Test metrics: ', 1)[1].splitlines()[0])
        # mmseg's visualiser nests its pictures (vis_data/vis_image/); report where they are
        pictures = sorted(glob.glob(osp.join(REPO, show_dir, '**', '*.png'), recursive=True))
        where = osp.relpath(osp.dirname(pictures[0]), REPO) if pictures else show_dir
        summary.append(f"{job['config']}: {job['metric']} = {metrics[job['metric']]:.3f}, "
                       f'{len(pictures)} pictures in {where}/ '
                       f'({time.perf_counter() - start:.0f} s)')
        print(summary[-1], flush=True)
    print('\n'.join(['', 'Demo finished:'] + summary))


if __name__ == '__main__':
    main()
