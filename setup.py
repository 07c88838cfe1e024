"""composer_ext: training techniques for the MosaicML Composer trainer."""

import ast
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _registry_literal(name: str) -> dict:
    """Read a literal dict from composer_ext/registry.py without importing the package (no deps needed)."""
    tree = ast.parse((HERE / 'composer_ext' / 'registry.py').read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise RuntimeError(f'composer_ext/registry.py has no literal {name}')


def _entry_points(name: str) -> list:
    return [f'{key} = {value}' for key, value in sorted(_registry_literal(name).items())]


setup(
    name='composer-ext',
    version='0.1.0',
    description='Training techniques for the MosaicML Composer trainer: domain upsampling, perplexity pruning, '
    'random-teacher distillation, parallel blockwise distillation, LoRA probes, CEV/SDE fairness.',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['composer_ext', 'composer_ext.*']),
    package_data={'composer_ext': ['py.typed']},
    python_requires='>=3.10',
    install_requires=[
        'mosaicml==0.32.1',  # pins torch>=2.6,<2.7.1 and torchvision>=0.21,<0.22.1
        'mosaicml-streaming>=0.12,<0.14',  # llm-foundry 0.22 pins <0.13
        'transformers>=4.51,<5',  # llm-foundry 0.22 pins <4.52
        'omegaconf>=2.3,<3',
        'peft>=0.13',
        'torchmetrics>=1.0,<1.7.5',
        'tokenizers>=0.19',
        'matplotlib>=3.7',
        'tqdm>=4.62',
        'numpy<2.2',
        # Demo data that ships inside pip packages (the Debian packages are listed in the README).
        'chitchat-dataset==0.9.0',
        'licensedcode-data==32.1.0',
        'scikit-learn>=1.3',
    ],
    extras_require={
        'test': ['pytest>=7', 'pytest-timeout>=2'],
        'bench': ['fairlearn>=0.10'],
        # Run our techniques from llm-foundry YAMLs (yamls/llmfoundry/); install.sh installs it.
        'llmfoundry': ['llm-foundry>=0.22,<0.23'],
    },
    entry_points={
        'console_scripts': ['composer-ext = composer_ext.cli:main'],
        'llmfoundry_algorithms': _entry_points('ALGORITHMS'),
        'llmfoundry_callbacks': _entry_points('CALLBACKS'),
        'llmfoundry_callbacks_with_config': _entry_points('CALLBACKS_WITH_CONFIG'),
        'llmfoundry_dataloaders': _entry_points('FOUNDRY_DATALOADERS'),
    },
)
