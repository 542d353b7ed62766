"""Run Python code inside a gVisor sandbox and show what happened there."""
from gworker_client import Sandbox

with Sandbox.create(timeout=120) as sb:  # debian-slim, the default image
    p = sb.exec(["python3", "-c", "import platform, sys; print('hello from', platform.system(), 'python', sys.version.split()[0]); print(sum(range(10**6)))"])
    print(p.stdout.read(), end="")
    print("exit code:", p.wait())
    p = sb.exec("uname -a; dmesg | head -n 3")
    print(p.stdout.read(), end="")
    print("sandbox id:", sb.sandbox_id)
