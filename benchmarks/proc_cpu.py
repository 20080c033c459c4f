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


def per_request_ms(before: dict, after: dict, requests: int, top: int = 6) -> dict[str, float]:
    """CPU ms per request by process name, largest first."""
    spent: dict[str, float] = {}
    for key, seconds in after.items():
        delta = seconds - before.get(key, 0.0)
        if delta > 0:
            spent[key[1]] = spent.get(key[1], 0.0) + delta
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    return {name: round(seconds * 1000 / requests, 2) for name, seconds in ranked}
