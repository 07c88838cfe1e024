"""The README's commands are the ones CI runs, and its Python example works."""

import re

import pytest

from tests.conftest import ROOT

README = (ROOT / 'README.md').read_text()


def _quickstart_commands():
    section = README.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```bash\n(.*?)\n```', section, re.DOTALL)


def test_quickstart_is_exactly_two_commands_and_ci_runs_them():
    install_and_run, test_command = _quickstart_commands()
    assert '\n' not in install_and_run and '\n' not in test_command
    install_part = install_and_run.split(' && ')[0]
    assert install_and_run.endswith('composer-ext run yamls/quickstart.yaml')
    ci_lines = [line for line in (ROOT / '.ci/run').read_text().splitlines() if line and not line.startswith('#')]
    assert install_part in ci_lines and test_command in ci_lines


def test_ci_also_runs_the_scaled_down_reproductions_and_fails_with_them():
    script = (ROOT / '.ci/run').read_text()
    assert '.venv/bin/pytest -q -m reproduction' in script and 'exit "$status"' in script
    assert '`.venv/bin/pytest -q -m reproduction`' in README.split('## Development', 1)[1]
    assert 'set -euo pipefail' in script  # a failing default suite ends CI red before the reproductions' verdict


def test_readme_python_example_trains(tmp_path):
    block = re.search(r'## Attach an algorithm to your own Trainer.*?```python\n(.*?)```', README, re.DOTALL).group(1)
    code = block.replace("max_duration='1ep'", "max_duration='2ba'")
    namespace = {}
    exec(compile(code, 'README example', 'exec'), namespace)
    assert namespace['trainer'].state.timestamp.batch.value == 2


@pytest.mark.slow  # builds the GPT and six evaluators (~30 s); DomainUpsampling is covered by its own tests
def test_readme_domain_upsampling_example_trains(corpus):
    block = re.search(r'### Domain upsampling.*?```python\n(.*?)```', README, re.DOTALL).group(1)
    code = block.replace("max_duration='600ba'", "max_duration='5ba'").replace(
        "build_text_evaluators(batch_size=32, domains='all')",
        "build_text_evaluators(batch_size=32, domains='all', subset_num_batches=1)")  # not the whole val split
    assert code.count('5ba') == 1 and 'subset_num_batches=1' in code
    namespace = {}
    exec(compile(code, 'README domain upsampling example', 'exec'), namespace)
    trainer = namespace['trainer']
    assert trainer.state.timestamp.batch.value == 5
    assert type(trainer.state.algorithms[0]).__name__ == 'DomainUpsampling'
