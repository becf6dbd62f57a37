"""The product's code runs on every Python an image uses: 3.10 (the MetaX image), 3.11 (the
CPU image and ./build.sh), 3.12 (the NVIDIA image). vermin reads the code for the newest
feature each file needs; nothing may need more than 3.10."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT_CODE = ["preprocess", "shim", "model_repository"]
VERMIN = [str(Path(sys.executable).parent / "vermin"), "--target=3.10-", "--no-tips", "--violations", "--eval-annotations",
          "--no-parse-comments"]


def vermin(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([*VERMIN, *map(str, paths)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_product_code_needs_no_more_than_python_3_10():
    result = vermin(*PRODUCT_CODE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Minimum required versions: 3.10" in result.stdout or "Minimum required versions: 3.0" in result.stdout, \
        result.stdout


@pytest.mark.parametrize("code, needs", [
    ("import tomllib\n", "3.11"),                                   # a module
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "3.11"),    # syntax
    ("from typing import Self\n", "3.11"),                          # a name
    ("from typing import override\n", "3.12"),                      # a name
])
def test_the_check_fails_on_code_newer_than_3_10(tmp_path, code, needs):
    (tmp_path / "newer.py").write_text(code)
    result = vermin(tmp_path)
    assert result.returncode != 0 and f"Minimum required versions: {needs}" in result.stdout, result.stdout
