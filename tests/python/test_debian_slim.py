"""The default image works like a Debian machine: coreutils, Python, files."""

from __future__ import annotations

from helpers import run


def test_coreutils_work_under_gvisor(py_sandbox):
    # `ls`, `stat`, `cp`, `mv` call statx with AT_NO_AUTOMOUNT, which this
    # gVisor refuses: the image preloads a fix (crates/images/src/statx_fix.c).
    code, out, err = run(py_sandbox, "mkdir -p /w && echo hi > /w/a && cp /w/a /w/b && mv /w/b /w/c && ls /w && stat -c %s /w/a && ls / | grep -c usr")
    assert (code, err) == (0, "")
    assert out == "a\nc\n3\n1\n"


def test_python_sees_the_files_the_shell_wrote(py_sandbox):
    run(py_sandbox, "echo 21 > /tmp/n")
    assert run(py_sandbox, ["python3", "-c", "print(int(open('/tmp/n').read()) * 2)"]) == (0, "42\n", "")


def test_the_utf8_locale_is_set_and_loads_from_one_archive(py_sandbox):
    # LANG=C.UTF-8 is the image's default; its locale comes from
    # /usr/lib/locale/locale-archive (one file per process, not 13).
    code, out, err = run(py_sandbox, ["python3", "-c", "import locale, sys; print(locale.setlocale(locale.LC_ALL, ''), sys.stdout.encoding); print('h\\u00e9')"])
    assert (code, out, err) == (0, "C.UTF-8 utf-8\nhé\n", "")
    assert run(py_sandbox, ["localedef", "--list-archive"]) == (0, "C.utf8\n", "")
