"""The warm-Python server behaves as a fresh ``python -c`` / ``python script.py`` would."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import warm_python
from dist_helpers import PYTHON, base_env


def _run(
    tmp_path: Path, args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str]:
    with open(tmp_path / "out.txt", "w+b") as out:
        process = warm_python.start(
            args, env=env or base_env(), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
        code = process.wait(timeout=timeout)
        out.seek(0)
        return code, out.read().decode()


def test_code_sees_the_requests_environment_directory_and_argv(tmp_path: Path) -> None:
    code = (
        "import os, sys, json, numpy\n"
        "print(json.dumps([os.environ.get('EMBER_X'), os.getcwd(), sys.argv, sys.path[0], 'torch' in sys.modules,"
        " hasattr(sys.modules['__main__'], '__file__'), int(numpy.random.randint(2**31))]))\n"
    )
    _, first = _run(tmp_path, [PYTHON, "-c", code, "a"], env=base_env(EMBER_X="1"))
    _, second = _run(tmp_path, [PYTHON, "-c", code, "a"], env=base_env(EMBER_X="1"))
    env_x, cwd, argv, path0, preloaded, has_file, draw = json.loads(first)
    assert (env_x, cwd, argv, path0, preloaded, has_file) == (
        "1",
        str(tmp_path),
        ["-c", "a"],
        "",
        True,
        False,
    )
    assert json.loads(second)[-1] != draw  # NumPy's global generator is seeded per process, as in a fresh one


def test_script_runs_as_main_with_its_file_and_directory(tmp_path: Path) -> None:
    (tmp_path / "helper_mod.py").write_text("VALUE = 7\n")
    (tmp_path / "script.py").write_text(
        "import sys, helper_mod\nif __name__ == '__main__':\n    print(__file__, sys.argv[1:], helper_mod.VALUE)\n"
    )
    code, out = _run(tmp_path, [PYTHON, "script.py", "--flag"])
    assert code == 0
    assert out.split() == [str(tmp_path / "script.py"), "['--flag']", "7"]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("raise ValueError('boom')", 1),
        ("import sys; sys.exit(3)", 3),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM),
    ],
)
def test_exit_codes_are_a_fresh_interpreters(tmp_path: Path, code: str, expected: int) -> None:
    returncode, out = _run(tmp_path, [PYTHON, "-c", code])
    assert returncode == expected
    if expected == 1:
        assert "ValueError: boom" in out


def test_atexit_handlers_run_and_output_is_flushed(tmp_path: Path) -> None:
    code = "import atexit, sys\natexit.register(lambda: print('bye'))\nsys.stdout.write('no newline')\n"
    assert _run(tmp_path, [PYTHON, "-c", code]) == (0, "no newlinebye\n")


def test_kill_reports_the_signal(tmp_path: Path) -> None:
    with open(tmp_path / "out.txt", "wb") as out:
        process = warm_python.start(
            [PYTHON, "-c", "import time; time.sleep(60)"],
            env=base_env(),
            cwd=tmp_path,
            stdout=out,
            stderr=out,
        )
        assert isinstance(process, warm_python.WarmProcess)
        assert process.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.2)
        process.kill()
        assert process.wait(timeout=10) == -signal.SIGKILL


def test_what_is_fixed_at_start_gets_a_real_interpreter(tmp_path: Path) -> None:
    with open(tmp_path / "out.txt", "wb") as out:
        threads = warm_python.start(
            [PYTHON, "-c", "pass"],
            env={**base_env(), "OMP_NUM_THREADS": "2"},
            cwd=tmp_path,
            stdout=out,
            stderr=out,
        )
        options = warm_python.start(
            [PYTHON, "-X", "importtime", "-c", "pass"], env=base_env(), cwd=tmp_path, stdout=out, stderr=out
        )
    assert isinstance(threads, subprocess.Popen) and threads.wait() == 0
    assert isinstance(options, subprocess.Popen) and options.wait() == 0
