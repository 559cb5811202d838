from setuptools import find_packages, setup


def read_version():
    namespace = {}
    with open('poolformer_mm/version.py') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


def read_requirements(name):
    """The requirement lines of requirements/<name>.txt (tools/install.sh reads the same files)."""
    with open(f'requirements/{name}.txt') as f:
        lines = (line.split('#', 1)[0].strip() for line in f)
        return [line for line in lines if line]


setup(
    name='poolformer-mm',
    version=read_version(),
    description='PoolFormer / MetaFormer backbones for mmdetection 3.x and mmsegmentation 1.x',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['poolformer_mm', 'poolformer_mm.*']),
    python_requires='>=3.8',
    install_requires=read_requirements('runtime'),
    extras_require={'tests': read_requirements('tests'),
                    'analysis': read_requirements('analysis'),
                    'deploy': read_requirements('deploy')},
    license='Apache-2.0',
)
