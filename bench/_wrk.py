"""Drive an HTTP endpoint with wrk (Debian package `wrk`) and parse its figures.

wrk is used because Python HTTP clients saturate a core long before the server under test does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def require_wrk() -> str:
    path = shutil.which("wrk")
    if not path:
        raise SystemExit("wrk is needed for this benchmark: apt-get install -y wrk")
    return path


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def run_wrk(url: str, *, bodies: list[dict], path: str, headers: dict[str, str],
            connections: int, seconds: int, timeout_s: int = 120) -> dict:
    """POST the bodies round-robin at `connections` concurrency for `seconds`; wrk's figures.

    wrk's own request timeout is 2 s, shorter than a real model's answer on CPU: a timed-out
    request counts as a socket error and is left out of the latency figures."""
    lua = "bodies = {%s}\nheaders = %s\ni = 0\nrequest = function()\n  i = i + 1\n" \
          "  return wrk.format('POST', '%s', headers, bodies[(i %% #bodies) + 1])\nend\n" \
          "done = function(summary, latency, requests)\n" \
          "  io.write(string.format('ERRORS %%d %%d\\n', summary.errors.status, " \
          "summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\nend\n"
    body_list = ", ".join(_lua_str(json.dumps(b)) for b in bodies)
    header_tbl = "{" + ", ".join(f"[{_lua_str(k)}]={_lua_str(v)}" for k, v in
                                 {"Content-Type": "application/json", **headers}.items()) + "}"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua % (body_list, header_tbl, path))
    out = subprocess.run([require_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          f"--timeout={timeout_s}s", "-s", f.name, url],
                         capture_output=True, text=True, check=True).stdout
    Path(f.name).unlink()
    if "Requests/sec" not in out or "50%" not in out:
        raise RuntimeError(f"wrk printed no figures:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    # Anchored: the stdev column ("75.50%") also ends in "50%".
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    non2xx, sock = (int(x) for x in re.search(r"ERRORS (\d+) (\d+)", out).groups())
    return {"throughput_rps": rps, "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
            "non_2xx": non2xx, "socket_errors": sock}


def _lua_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
