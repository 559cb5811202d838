from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open('poolformer_mm/version.py') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='poolformer-mm',
    version=read_version(),
    description='PoolFormer / MetaFormer backbones for mmdetection 3.x and mmsegmentation 1.x',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['poolformer_mm', 'poolformer_mm.*']),
    python_requires='>=3.8',
    # mmdet 3.3 and mmseg 1.2 assert mmcv < 2.2 at import; mmcv 2.1.0 does not build with
    # torch >= 2.14 (C++20); torch >= 2.1 for scaled-dot-product attention and weights_only loads.
    install_requires=[
        'torch>=2.1,<2.14',
        'mmengine>=0.10.4,<0.11',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.1,<3.4',
        'mmsegmentation>=1.1,<1.3',
        'pycocotools',
        'ftfy',  # mmseg imports ftfy and regex at start-up without declaring them
        'regex',
        'numpy',
    ],
    extras_require={'tests': ['pytest']},
    license='Apache-2.0',
)
