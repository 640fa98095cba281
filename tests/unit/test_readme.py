"""The README stays true: its settings table is group_data/all.py's, its quick start is two commands, CI runs the second."""

import re

import pytest

from gpufleet.settings import REPO_ROOT, load_settings, markdown_table

README = (REPO_ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match[1]


def test_settings_table_matches_group_data_all():
    table = "\n".join(line for line in section("Settings").splitlines() if line.startswith("|"))
    assert table == markdown_table(), "regenerate it: python -m gpufleet.settings"


@pytest.mark.parametrize("above", ["", "\n", "#\n"], ids=["another setting", "blank line", "empty comment"])
def test_a_setting_without_a_comment_for_its_readme_row_is_refused(tmp_path, above):
    path = tmp_path / "all.py"
    path.write_text(f"# the first setting\nfirst: int = 1\n{above}second: str = 'a'\n")
    with pytest.raises(ValueError, match=r"all.py:\d: setting second needs a one-line comment above it"):
        load_settings(path)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    commands = re.findall(r"```sh\n(.*?)\n```", section("Quick start"), re.S)
    assert len(commands) == 2, commands
    assert all("\n" not in command for command in commands)
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "the README's test command must be the line .ci/run runs"
    assert "pyinfra -y inventory.py deploys/full.py" in commands[0]
