"""CPU seconds by process on this machine, from /proc: who pays for a benchmark phase.

Ray names its processes (`ray::ServeReplica:<app>:Router`, ...), so a snapshot before
and after a phase shows what each part of the miner cost per request.
"""

import os


def snapshot() -> dict[tuple[str, str], float]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        name = cmd.split(" ")[0] if cmd else stat[stat.find("(") + 1 : stat.rfind(")")]
        name = cmd[:60] if name.startswith("ray::") else os.path.basename(name)[:40]
        out[(pid, name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def spent(before: dict, after: dict) -> dict[tuple[str, str], float]:
    """CPU seconds each process spent between two snapshots, keyed as `after` names it. Matched by
    pid: a Ray worker's title names the method it runs, so one process may change names mid-phase
    (matched by name, its whole life's CPU counted as the phase's)."""
    before_pid = {pid: seconds for (pid, _), seconds in before.items()}
    return {key: seconds - before_pid.get(key[0], 0.0) for key, seconds in after.items()
            if seconds > before_pid.get(key[0], 0.0)}


def per_request_ms(before: dict, after: dict, requests: int, top: int = 6) -> dict[str, float]:
    """CPU ms per request by process name, largest first."""
    by_name: dict[str, float] = {}
    for (_, name), seconds in spent(before, after).items():
        by_name[name] = by_name.get(name, 0.0) + seconds
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds * 1000 / requests, 2) for name, seconds in ranked}
