"""
The recipes for models on other hosts, run for real against a stand-in
``ssh`` that executes the remote command here: the managed-server wrapper
(``etc/swap-scripts/ssh-server.sh``) and systemd over ssh.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from procs import ROOT, free_port, get, post_json, start_jano

pytestmark = pytest.mark.integration

#: A stand-in ssh: records its argv, skips the options, runs the remote command with sh.
FAKE_SSH = """#!/bin/sh
echo "$*" >> "{log}"
while [ $# -gt 0 ]; do
    case $1 in
        -o|-i|-p) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
host=$1
shift
exec sh -c "$*"
"""


def fake_ssh(tmp: Path) -> tuple[Path, Path]:
    log = tmp / "ssh.log"
    path = tmp / "ssh"
    path.write_text(FAKE_SSH.format(log=log))
    path.chmod(0o755)
    return path, log


def test_a_managed_server_on_another_host_through_ssh(tmp_path: Path) -> None:
    ssh, log = fake_ssh(tmp_path)
    base = free_port()
    argv = [str(ROOT / "etc/swap-scripts/ssh-server.sh"), "gpu-box", sys.executable, "-m",
            "jano.testing", "--port", "{port}", "--model", "it's {model}", "--quiet"]
    # start_jano fills every "{port}" with Jano's own: spell this one as a TOML escape.
    command = json.dumps(argv).replace("{port}", "\\u007Bport}")
    jano = start_jano(tmp_path, f"""
[server]
listen = "tcp:{{port}}:interface=127.0.0.1"
[processes]
port_range = [{base}, {base + 20}]
[[models]]
name = "remote"
command = {command}
env = {{ SSH = "{ssh}", SSH_OPTIONS = "-i /etc/jano/key" }}
""")
    try:
        code, _, body = post_json(jano.url + "/v1/chat/completions",
                                  {"model": "remote", "messages": []})
        assert code == 200, body
        recorded = log.read_text()
        assert recorded.startswith("-tt -o BatchMode=yes -o ServerAliveInterval=5 "
                                   "-o ServerAliveCountMax=3 -i /etc/jano/key gpu-box exec ")
        pid = json.loads(get(jano.url + "/status")[2])["processes"]["remote"]["pid"]
        logs = get(jano.url + "/logs/remote")[2]
        assert b"server is listening" in logs
        assert b"loading model it's remote" in logs  # the quote survived the trip
    finally:
        jano.stop(signal.SIGTERM)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_systemd_over_ssh_is_the_systemd_script_with_systemctl_behind_ssh(tmp_path: Path) -> None:
    ssh, log = fake_ssh(tmp_path)
    calls = tmp_path / "systemctl.log"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    systemctl.chmod(0o755)
    env = dict(os.environ, SYSTEMCTL=f"{ssh} -o BatchMode=yes gpu-box {systemctl} --user",
               JANO_ACTION="swap")
    subprocess.run([str(ROOT / "etc/swap-scripts/llama-server-systemd.sh"), "coder", "chat"],
                   env=env, check=True, capture_output=True, timeout=30)
    assert calls.read_text().splitlines() == ["--user stop llama-server@chat.service",
                                              "--user restart llama-server@coder.service"]
    assert log.read_text().splitlines()[0].startswith("-o BatchMode=yes gpu-box ")
