import pytest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus of Python files for the CLI runs of a module (a test file may define its own)."""
    root = tmp_path_factory.mktemp("corpus")
    for index in range(4):
        (root / f"part{index}.py").write_text(
            "".join(f"def function_{index}_{n}(x):\n    return x * {n} - {index}\n\n" for n in range(50))
        )
    return root
