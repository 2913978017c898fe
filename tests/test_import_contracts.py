"""The wings depend one way: pyproject.toml's import-linter contracts, checked by lint-imports as CI runs it.

A copy of src/ with one planted violation shows that the contracts bite: a broken contract fails the run
and is named.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

from conftest import REPO

# lint-imports with src/ first on the path and this environment's site-packages after it, their .pth files
# unread (python -S): an editable install's import hook (it points at the checkout) would otherwise win.
_RUN = (
    "import runpy, sys; src, packages, script = sys.argv[1:4]; sys.path[:0] = [src]; sys.path.append(packages); "
    "sys.argv = [script, *sys.argv[4:]]; runpy.run_path(script, run_name='__main__')"
)


def _lint_imports(root, src):
    """lint-imports on the package under src/, with root's pyproject.toml contracts."""
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return subprocess.run(
        [sys.executable, "-S", "-c", _RUN, str(src), sysconfig.get_paths()["purelib"], lint, "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_contract_is_kept():
    result = _lint_imports(REPO, os.path.join(REPO, "src"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_model_importing_training_breaks_the_layers(tmp_path):
    shutil.copy(os.path.join(REPO, "pyproject.toml"), tmp_path)
    shutil.copytree(os.path.join(REPO, "src", "alexnet_jax"), tmp_path / "src" / "alexnet_jax")
    model = tmp_path / "src" / "alexnet_jax" / "model" / "alexnet.py"
    model.write_text(model.read_text() + "\n\ndef _planted():\n    from alexnet_jax.training import loop  # noqa\n")
    result = _lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "The wings form layers" in result.stdout and "BROKEN" in result.stdout
    assert "alexnet_jax.model.alexnet -> alexnet_jax.training.loop" in result.stdout
