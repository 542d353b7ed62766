"""The default image works like a Debian machine: coreutils, Python, files."""

from __future__ import annotations

from gworker_client.sandbox import Image
from helpers import run


def test_coreutils_work_under_gvisor(py_sandbox):
    # `ls`, `stat`, `cp`, `mv` call statx with AT_NO_AUTOMOUNT, which this
    # gVisor refuses: the image's libc drops the flag (crates/images/src/statx.rs).
    code, out, err = run(py_sandbox, "mkdir -p /w && echo hi > /w/a && cp /w/a /w/b && mv /w/b /w/c && ls /w && stat -c %s /w/a && ls / | grep -c usr")
    assert (code, err) == (0, "")
    assert out == "a\nc\n3\n1\n"


def test_no_library_is_preloaded_into_every_process(py_sandbox):
    # The statx fix is in libc itself: a preloaded library cost ~1.1 ms per
    # process under this gVisor.
    assert run(py_sandbox, "test -e /etc/ld.so.preload")[0] == 1
    assert run(py_sandbox, "grep -c statx-fix /proc/self/maps")[1] == "0\n"


# Unpatches libc at the offset the guard checks, replacing the file as an
# upgrade of libc6 would (a new file renamed over the old one).
UNPATCH = r"""
import os, re
guard = open("/usr/lib/gworker/statx-guard").read()
off = int(re.search(r"-j (\d+)", guard).group(1))
lib = "/usr/lib/x86_64-linux-gnu/libc.so.6"
data = bytearray(open(lib, "rb").read())
assert data[off:off + 3] == bytes.fromhex("80e6f7"), data[off:off + 8].hex()
data[off:off + 8] = bytes.fromhex("4189cab84c010000")
open(lib + ".new", "wb").write(data)
os.chmod(lib + ".new", 0o755)
os.rename(lib + ".new", lib)
"""


def test_a_dpkg_run_that_replaces_libc_keeps_coreutils_working(sandboxes):
    sb = sandboxes(image=Image.debian_slim(python_version="3.11"), timeout=300)
    # A dpkg run that leaves libc alone: the fix is preloaded only while it runs.
    assert run(sb, "dpkg --configure -a && test ! -e /etc/ld.so.preload && ls / | grep -c usr") == (0, "1\n", "")
    # libc replaced without the patch (as `apt-get upgrade` could): after the
    # next dpkg run the preloaded fix stays, and `ls` keeps working.
    assert run(sb, ["python3", "-c", UNPATCH]) == (0, "", "")
    code, _, err = run(sb, "ls /")
    assert code != 0 and "Invalid argument" in err, "without the fix this gVisor fails ls"
    assert run(sb, "dpkg --configure -a && cat /etc/ld.so.preload") == (0, "/usr/lib/gworker/statx-fix.so\n", "")
    code, out, err = run(sb, "mkdir /w && echo hi > /w/a && cp /w/a /w/b && ls /w && stat -c %s /w/b")
    assert (code, out, err) == (0, "a\nb\n3\n", "")


def test_python_sees_the_files_the_shell_wrote(py_sandbox):
    run(py_sandbox, "echo 21 > /tmp/n")
    assert run(py_sandbox, ["python3", "-c", "print(int(open('/tmp/n').read()) * 2)"]) == (0, "42\n", "")


def test_the_utf8_locale_is_set_and_loads_from_one_archive(py_sandbox):
    # LANG=C.UTF-8 is the image's default; its locale comes from
    # /usr/lib/locale/locale-archive (one file per process, not 13).
    code, out, err = run(py_sandbox, ["python3", "-c", "import locale, sys; print(locale.setlocale(locale.LC_ALL, ''), sys.stdout.encoding); print('h\\u00e9')"])
    assert (code, out, err) == (0, "C.UTF-8 utf-8\nhé\n", "")
    assert run(py_sandbox, ["localedef", "--list-archive"]) == (0, "C.utf8\n", "")
