"""
This process's CPU and memory limits and usage, as cgroups report them.

Two layers, so that the parsing is tested on real file contents without a
real cgroup:

* pure parsers (``parse_*``) take a file's *contents* and return numbers.
  Anything they cannot make sense of raises :class:`CgroupFileError` (a
  ``ValueError``), whose message names the file and quotes what it held.
* :class:`CgroupFS` finds this process's own cgroup below a mount root
  (``/sys/fs/cgroup`` by default; tests pass a temporary directory) and reads
  limits and usage through the parsers.

Units: CPU quotas are in CPUs (``1.5`` = one and a half cores), CPU usage in
CPU-seconds, memory in bytes.  "No limit" is ``math.inf``.  A *missing* file
means "not limited / not accounted here"; a file that is present but garbled
is an error, because guessing would make the gate admit jobs a limit forbids.

Unlike the original, the reader looks at this process's own cgroup (from
``/proc/self/cgroup``) and at every ancestor up to the mount root, taking the
tightest limit: a systemd service's ``CPUQuota=`` or ``MemoryMax=`` counts
on a bare host, and a limit on a parent slice counts too.  Inside a container
with its own cgroup namespace the own cgroup *is* the root, as before.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = [
    "CGROUP_ROOT",
    "PROC_SELF_CGROUP",
    "CgroupFileError",
    "CgroupFS",
    "parse_byte_count",
    "parse_cfs_quota",
    "parse_cpu_max",
    "parse_cpu_stat_usage",
    "parse_cpuacct_usage",
    "parse_memory_limit_in_bytes",
    "parse_memory_max",
    "parse_memory_stat",
    "parse_proc_cgroup",
]

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"

# cgroup v1 reports "no memory limit" as PAGE_COUNTER_MAX pages, a number just
# under 2**63 whose exact value depends on the page size.
_V1_UNLIMITED_MEMORY = 2**62

# Directory names a v1 controller may be mounted under (co-mounted or not).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_V1_CPUACCT_DIRS = ("cpuacct", "cpu,cpuacct", "cpuacct,cpu", "cpu")


class CgroupFileError(ValueError):
    """A cgroup or /proc file held content we cannot interpret."""

    def __init__(self, path: str, content: str, problem: str) -> None:
        shown = content if len(content) <= 200 else content[:200] + "..."
        super().__init__(f"{path}: {problem} (content: {shown!r})")
        self.path = path
        self.content = content
        self.problem = problem


def _integer(text: str, path: str, content: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CgroupFileError(path, content, f"{what} {text!r} is not an integer") from None


# -- CPU ----------------------------------------------------------------------


def parse_cpu_max(content: str, path: str = "cpu.max") -> float:
    """cgroup v2 ``cpu.max`` (``"$MAX $PERIOD"``, ``MAX`` may be ``max``) -> CPUs, or inf."""
    words = content.split()
    if len(words) == 1 and words[0] == "max":
        return math.inf
    if len(words) != 2:
        raise CgroupFileError(path, content, 'expected "$MAX $PERIOD"')
    quota_text, period_text = words
    period = _integer(period_text, path, content, "period")
    if period <= 0:
        raise CgroupFileError(path, content, "period must be positive")
    if quota_text == "max":
        return math.inf
    quota = _integer(quota_text, path, content, "quota")
    if quota <= 0:
        raise CgroupFileError(path, content, "quota must be positive or 'max'")
    return quota / period


def parse_cfs_quota(
    quota_content: str,
    period_content: str,
    quota_path: str = "cpu.cfs_quota_us",
    period_path: str = "cpu.cfs_period_us",
) -> float:
    """cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` -> CPUs, or inf (quota -1)."""
    quota = _integer(quota_content.strip(), quota_path, quota_content, "quota")
    if quota < 0:
        return math.inf
    if quota == 0:
        raise CgroupFileError(quota_path, quota_content, "quota must be positive or -1")
    period = _integer(period_content.strip(), period_path, period_content, "period")
    if period <= 0:
        raise CgroupFileError(period_path, period_content, "period must be positive")
    return quota / period


def parse_cpu_stat_usage(content: str, path: str = "cpu.stat") -> float:
    """cgroup v2 ``cpu.stat`` -> CPU-seconds used so far (from ``usage_usec``)."""
    for line in content.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "usage_usec":
            usec = _integer(words[1], path, content, "usage_usec")
            if usec < 0:
                raise CgroupFileError(path, content, "usage_usec is negative")
            return usec / 1_000_000
    raise CgroupFileError(path, content, "no usage_usec line")


def parse_cpuacct_usage(content: str, path: str = "cpuacct.usage") -> float:
    """cgroup v1 ``cpuacct.usage`` (nanoseconds) -> CPU-seconds used so far."""
    nsec = _integer(content.strip(), path, content, "usage")
    if nsec < 0:
        raise CgroupFileError(path, content, "usage is negative")
    return nsec / 1_000_000_000


# -- memory ---------------------------------------------------------------------


def parse_byte_count(content: str, path: str = "memory.current") -> int:
    """A file holding one non-negative byte count (``memory.current``, ``memory.usage_in_bytes``)."""
    value = _integer(content.strip(), path, content, "byte count")
    if value < 0:
        raise CgroupFileError(path, content, "byte count is negative")
    return value


def parse_memory_max(content: str, path: str = "memory.max") -> float:
    """cgroup v2 ``memory.max`` -> bytes, or inf for ``max``."""
    if content.strip() == "max":
        return math.inf
    return float(parse_byte_count(content, path))


def parse_memory_limit_in_bytes(content: str, path: str = "memory.limit_in_bytes") -> float:
    """cgroup v1 ``memory.limit_in_bytes`` -> bytes, or inf for the "unlimited" near-2**63 value."""
    value = _integer(content.strip(), path, content, "limit")
    if value < 0 or value >= _V1_UNLIMITED_MEMORY:
        return math.inf
    return float(value)


def parse_memory_stat(content: str, path: str = "memory.stat") -> dict[str, int]:
    """``memory.stat`` (v1 or v2): ``"key value"`` lines -> dict."""
    stats: dict[str, int] = {}
    for line in content.splitlines():
        words = line.split()
        if not words:
            continue
        if len(words) != 2:
            raise CgroupFileError(path, content, f"line {line!r} is not 'key value'")
        stats[words[0]] = _integer(words[1], path, content, words[0])
    return stats


# -- which cgroup is ours ----------------------------------------------------------


def parse_proc_cgroup(content: str, path: str = PROC_SELF_CGROUP) -> dict[str, str]:
    """
    ``/proc/<pid>/cgroup`` -> {controller: cgroup path}.

    v1 lines (``4:cpu,cpuacct:/docker/abc``) give one entry per controller
    (``cpu`` and ``cpuacct``); the v2 line (``0::/system.slice/x.service``)
    gives the key ``""``.
    """
    paths: dict[str, str] = {}
    for line in content.splitlines():
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise CgroupFileError(path, content, f"line {line!r} is not 'id:controllers:/path'")
        _, controllers, cgroup_path = parts
        if not controllers:
            paths[""] = cgroup_path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = cgroup_path
    return paths


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None


class CgroupFS:
    """
    This process's cgroups below one mount root: limits and usage.

    The directories are found once, at construction (a process does not
    normally change cgroups); the files are read on every call, since usage
    changes.  Each ``*_chain`` lists this process's cgroup first and then its
    ancestors up to the mount root; a limit anywhere on the chain applies.
    ``version`` is 2 (unified hierarchy at the root), 1 (per-controller
    hierarchies) or ``None`` (no cgroups found: every limit is inf and there
    is no accounting).
    """

    def __init__(self, root: str | Path = CGROUP_ROOT, proc_self_cgroup: str | Path | None = PROC_SELF_CGROUP) -> None:
        self.root = Path(root)
        own: dict[str, str] = {}
        if proc_self_cgroup is not None:
            content = _read(Path(proc_self_cgroup))
            if content is not None:
                own = parse_proc_cgroup(content, str(proc_self_cgroup))
        self.version: int | None
        if (self.root / "cgroup.controllers").is_file():
            self.version = 2
            chain = self._chain(self.root, own.get(""))
            self.cpu_chain = self.memory_chain = self.cpuacct_chain = chain
        else:
            cpu = self._v1_mount(_V1_CPU_DIRS, "cpu.cfs_quota_us")
            cpuacct = self._v1_mount(_V1_CPUACCT_DIRS, "cpuacct.usage")
            memory = self._v1_mount(("memory",), "memory.limit_in_bytes")
            self.cpu_chain = self._chain(cpu, own.get("cpu")) if cpu else []
            self.cpuacct_chain = self._chain(cpuacct, own.get("cpuacct")) if cpuacct else []
            self.memory_chain = self._chain(memory, own.get("memory")) if memory else []
            self.version = 1 if (cpu or cpuacct or memory) else None

    def __repr__(self) -> str:
        return f"<CgroupFS v{self.version} root={str(self.root)!r}>"

    def _v1_mount(self, names: tuple[str, ...], marker: str) -> Path | None:
        for name in names:
            if (self.root / name / marker).is_file():
                return self.root / name
        return None

    @staticmethod
    def _chain(mount: Path, cgroup_path: str | None) -> list[Path]:
        """Own cgroup directory, then its parents up to ``mount``.

        When ``/proc/self/cgroup`` names a directory the mount does not show
        (a container whose mount root already is its own cgroup), the mount
        root is ours.
        """
        if cgroup_path:
            own = mount.joinpath(*[p for p in cgroup_path.split("/") if p and p not in (".", "..")])
            if own != mount and own.is_dir():
                chain = [own]
                while chain[-1] != mount:
                    chain.append(chain[-1].parent)
                return chain
        return [mount]

    # -- CPU ----------------------------------------------------------------

    def cpu_quota(self) -> float:
        """The tightest CPU bandwidth limit on our chain, in CPUs; inf when none."""
        quota = math.inf
        for directory in self.cpu_chain:
            if self.version == 2:
                path = directory / "cpu.max"
                content = _read(path)
                if content is not None:
                    quota = min(quota, parse_cpu_max(content, str(path)))
            else:
                quota_path = directory / "cpu.cfs_quota_us"
                period_path = directory / "cpu.cfs_period_us"
                quota_content = _read(quota_path)
                period_content = _read(period_path)
                if quota_content is not None and period_content is not None:
                    quota = min(
                        quota,
                        parse_cfs_quota(quota_content, period_content, str(quota_path), str(period_path)),
                    )
        return quota

    def cpu_usage(self) -> float | None:
        """CPU-seconds our cgroup has used so far; ``None`` when nothing accounts for it."""
        if not self.cpuacct_chain:
            return None
        own = self.cpuacct_chain[0]
        if self.version == 2:
            path = own / "cpu.stat"
            content = _read(path)
            return None if content is None else parse_cpu_stat_usage(content, str(path))
        path = own / "cpuacct.usage"
        content = _read(path)
        return None if content is None else parse_cpuacct_usage(content, str(path))

    # -- memory ---------------------------------------------------------------

    def _memory_files(self) -> tuple[str, str, str, str]:
        if self.version == 2:
            return "memory.max", "memory.current", "memory.stat", "inactive_file"
        return "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat", "total_inactive_file"

    def _limit(self, directory: Path) -> float:
        name = self._memory_files()[0]
        content = _read(directory / name)
        if content is None:
            return math.inf
        if self.version == 2:
            return parse_memory_max(content, str(directory / name))
        return parse_memory_limit_in_bytes(content, str(directory / name))

    def memory_limit(self) -> float:
        """The tightest memory limit on our chain, in bytes; inf when none."""
        return min((self._limit(d) for d in self.memory_chain), default=math.inf)

    def memory_working_set(self, directory: Path) -> float | None:
        """Bytes in use by one cgroup, not counting reclaimable inactive page cache.

        ``memory.current`` / ``usage_in_bytes`` include file cache the kernel
        drops before it OOM-kills anyone; counting it would make a container
        that reads files look full (the kubelet subtracts it the same way).
        """
        _, usage_name, stat_name, inactive_key = self._memory_files()
        content = _read(directory / usage_name)
        if content is None:
            return None
        usage = parse_byte_count(content, str(directory / usage_name))
        stat = _read(directory / stat_name)
        if stat is not None:
            stats = parse_memory_stat(stat, str(directory / stat_name))
            inactive = stats.get(inactive_key, stats.get("inactive_file", 0))
            usage = max(0, usage - inactive)
        return float(usage)

    def memory_headroom(self) -> float:
        """Bytes our cgroup may still allocate before hitting a limit on its chain; inf when none."""
        headroom = math.inf
        for directory in self.memory_chain:
            limit = self._limit(directory)
            if limit == math.inf:
                continue
            used = self.memory_working_set(directory)
            headroom = min(headroom, max(0.0, limit - (used or 0.0)))
        return headroom
