"""The commands of the README and of docs/ name files and targets that exist, and their links
lead somewhere, so following them verbatim works."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / 'README.md').read_text()
PAGES = [REPO / 'README.md', REPO / 'CHANGELOG.md', *sorted((REPO / 'docs').rglob('*.md'))]


def _mentioned(pattern):
    return sorted({found for page in PAGES for found in re.findall(pattern, page.read_text())})


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize('page', PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    text = page.read_text()
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+://', target):
            continue
        path, _, anchor = target.partition('#')
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f'{page.name} links to {target}, which does not exist'
        if anchor and linked.suffix == '.md':
            headings = re.findall(r'^#+ (.+)$', linked.read_text(), re.M)
            anchors = {re.sub(r'[^\w\- ]', '', h).strip().lower().replace(' ', '-')
                       for h in headings}
            assert anchor in anchors, f'{page.name} links to #{anchor}, not a heading of {path}'


@pytest.mark.parametrize('path', _mentioned(r'\b(?:tools|configs)/[\w/.-]+\.(?:py|sh)\b'))
def test_every_tool_and_config_the_readme_names_exists(path):
    assert (REPO / path).is_file(), f'the docs name {path}, which does not exist'


@pytest.mark.parametrize('target', _mentioned(r'\bmake ([a-z][\w-]*)'))
def test_every_make_target_the_readme_names_exists(target):
    makefile = (REPO / 'Makefile').read_text()
    assert re.search(rf'^{re.escape(target)}:', makefile, re.M), f'no make target {target}'


def test_the_readme_says_how_a_fresh_shell_finds_the_environment():
    # a fresh shell's `python tools/train.py` fails with "No module named 'poolformer_mm'"
    # unless the environment that `make` created is active
    quick_start = README.split('## Quick start', 1)[1].split('\n## ', 1)[0]
    assert 'source .venv/bin/activate' in quick_start


@pytest.mark.slow
@pytest.mark.parametrize('tool', _mentioned(r'python (tools/[\w/]+\.py)'))
def test_every_python_tool_the_readme_names_starts(tool):
    result = subprocess.run([sys.executable, tool, '--help'], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'usage:' in result.stdout
    assert 'Warning' not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize('tool', ['tools/train.py', 'tools/test.py'])
def test_a_shell_without_the_environment_is_told_to_activate_it(tool):
    # -S: no site-packages, so neither poolformer_mm nor the OpenMMLab stack can be imported
    result = subprocess.run([sys.executable, '-I', '-S', tool, 'config.py'], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "No module named 'poolformer_mm'. Activate the environment first: source "
        '.venv/bin/activate (see the README, "Quick start").']
