"""The checks every rank runs inside the process group: one run folder seen by all, the same code everywhere."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path

from launcher.distributed import node_label
from launcher.doctor.checks import Check, _run
from launcher.doctor.hardware import library_versions
from launcher.errors import LauncherError
from launcher.recipe.load import recipe_yaml
from launcher.recipe.schema import Recipe

SHARED_READ_WAIT_S = 3.0  # a network filesystem may show another node's new file a moment late


# ---- every rank ---------------------------------------------------------------------------------------------

def _ranks_text(members: list[tuple[int, str]]) -> str:
    """'rank 1 on node-b; ranks 8, 9 on node-c': who, by host, so a user knows which node to look at."""
    by_host: dict[str, list[int]] = {}
    for rank, host in members:
        by_host.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in by_host.items():
        shown = ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
        parts.append(f"rank{'s' if len(ranks) > 1 else ''} {shown} on {host}")
    return "; ".join(parts)


def _write_probe(run_dir: Path) -> tuple[str, str, str | None]:
    """Rank 0: a file with a random token in the run folder, synced to the server; (name, token, error)."""
    name, token = f".doctor-{secrets.token_hex(8)}", secrets.token_hex(16)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / name, "w", encoding="utf-8") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return name, token, f"{type(e).__name__}: {e}"
    return name, token, None


def _read_probe(path: Path, token: str) -> str | None:
    """None when the file holds the token, else what this rank saw; retried for a moment, because a network
    filesystem's attribute cache can show another node's new file late and a false alarm would stop a good job."""
    deadline = time.monotonic() + SHARED_READ_WAIT_S
    while True:
        try:
            problem = None if path.read_text(encoding="utf-8") == token else "it holds another token"
        except FileNotFoundError:
            problem = "no such file"
        except OSError as e:
            problem = f"{type(e).__name__}: {e}"
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.25)


def check_shared_run_folder(run_dir: Path) -> Check:
    """Collective. Rank 0 writes a token into the run folder, every rank reads it back. The broadcast that hands
    out the file's name is the first barrier (written before anyone reads), the all_gather of what each rank saw
    the second (everyone has read before rank 0 removes it). Every rank returns the same verdict."""
    import torch.distributed as dist

    rank, world, host = dist.get_rank(), dist.get_world_size(), node_label()
    probe = [_write_probe(Path(run_dir)) if rank == 0 else None]
    dist.broadcast_object_list(probe, src=0)
    name, token, write_error = probe[0]
    path = Path(run_dir) / name
    seen = write_error or _read_probe(path, token)
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, (rank, host, seen))
    if rank == 0 and write_error is None:
        path.unlink(missing_ok=True)
    writer = outcomes[0][1]
    if write_error:
        return Check("run-folder", "FAIL", f"rank 0 on {writer} cannot write {path}: {write_error}",
                     "make output_dir writable by the job's user on every node")
    blind = [(r, h) for r, h, s in outcomes if s is not None]
    if blind:
        first = next(s for _, _, s in outcomes if s is not None)
        return Check("run-folder", "FAIL",
                     f"{_ranks_text(blind)} cannot read {path} that rank 0 on {writer} wrote ({first}): the run "
                     "folder is not on a filesystem every rank sees; each node would write its own checkpoints and "
                     "--resume would break",
                     "put output_dir on a filesystem every node mounts at the same path (NFS, Lustre, ...); a relative "
                     "output_dir is relative to each node's working directory")
    hosts = len({h for _, h, _ in outcomes})
    return Check("run-folder", "OK", f"{Path(run_dir)}: a file rank 0 wrote was read back by all {world} ranks "
                                     f"on {hosts} host(s)")


def code_fingerprint() -> str:
    """sha256 of the launcher package's .py files (paths and contents, sorted): the code every rank runs (the whole
    package: the doctor's own folder alone missed a change anywhere else)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    try:
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError as e:  # a file removed while we read: report it as a difference, never raise mid-collective
        return f"unreadable ({type(e).__name__}: {e})"
    return h.hexdigest()


def git_commit() -> str | None:
    out = _run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent)
    return out.strip() if out else None


def _index_digest(folders: list[str]) -> str:
    from launcher.shards.location import Location

    try:
        h = hashlib.sha256()
        for folder in folders:
            h.update(Location.of(folder).read_bytes("index.json"))
        return h.hexdigest()
    except (OSError, LauncherError) as e:
        return f"unreadable ({type(e).__name__})"


def fingerprint(recipe: Recipe) -> dict[str, str | None]:
    """What must be the same on every rank; cheap (a few small files, one git call)."""
    return {"code": code_fingerprint(), "git commit": git_commit(),
            "libraries": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
            "recipe": hashlib.sha256(recipe_yaml(recipe).encode()).hexdigest(),
            "shards index": _index_digest([s.path for s in recipe.data.shard_sets])}


def _odd_ones(values: list[tuple[int, str, str | None]]) -> list[tuple[int, str, str | None]]:
    """The ranks whose value differs from the most common one (rank 0's on a tie); unknown values (None: no git
    on that node) are not a difference."""
    known = [v for _, _, v in values if v is not None]
    if not known:
        return []
    counts = {v: known.count(v) for v in known}
    best = max(counts.values())
    reference = values[0][2] if counts.get(values[0][2]) == best else max(counts, key=counts.get)
    return [(r, h, v) for r, h, v in values if v is not None and v != reference]


def check_same_everywhere(recipe: Recipe) -> Check:
    """Collective: the project code (and git commit), libraries, resolved recipe and shards index of every rank
    against the others'. Every rank returns the same verdict."""
    import torch.distributed as dist

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dist.get_rank(), node_label(), fingerprint(recipe)))
    problems, world = [], len(gathered)
    for key in gathered[0][2]:
        odd = _odd_ones([(r, h, fp[key]) for r, h, fp in gathered])
        if odd:
            shown = f": {odd[0][2]}" if key in ("libraries", "git commit") else ""
            problems.append(f"{key} differs on {_ranks_text([(r, h) for r, h, _ in odd])} from the other "
                            f"{world - len(odd)} rank(s){shown}")
    if problems:
        return Check("same-code", "FAIL", "; ".join(problems),
                     "start every node from the same checkout (git pull, or a shared filesystem), .venv (make setup), "
                     "recipe and --set overrides, and the same shards")
    fp = gathered[0][2]
    commit = f" (git {fp['git commit'][:10]})" if fp["git commit"] else ""
    return Check("same-code", "OK", f"code {fp['code'][:12]}{commit}, recipe {fp['recipe'][:12]}, shards index, "
                                    f"{fp['libraries']}: the same on all {len(gathered)} ranks")


def preflight_distributed(recipe: Recipe) -> list[Check]:
    """Collective: every rank calls it after init_distributed (and, on GPUs, after setting its device). Two
    broadcasts/gathers of small objects, no model; every rank gets the same list. What a rank computes on its own
    never raises (a rank that left early would hang the others), so an exception here is the process group's."""
    return [check_shared_run_folder(Path(recipe.output_dir)), check_same_everywhere(recipe)]
