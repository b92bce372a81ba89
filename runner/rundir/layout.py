"""The run directory's layout: its files' names, the run dir and sweep job dir resolvers, the
`latest` links, and the chats file of each input file.

Layout (Hydra writes `.hydra/` and `chat-runner.log` beside these):
    chats/<input-file-stem>.jsonl   one completed conversation a line, in input order
    manifest.json                   the config and the input files' sha256, checked by resume
    .lock                           held (flock) by the one process writing the dir; says its pid and host
    rejected.jsonl                  bad input lines, with input.on_error=skip
    summary.json                    config choices, counts, speed, memory, versions, hardware
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

from runner.errors import InputError

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


REJECTED = "rejected.jsonl"


LOCK = ".lock"


SUMMARY = "summary.json"


_claimed_dirs: dict[str, str] = {}


def unique_dir(base: str) -> str:
    """Hydra resolver for the run dir: `base`, or `base-1`, `base-2`... if another run holds it.

    `mkdir` claims a directory atomically, so two runs started in the same second never share one;
    the answer is remembered so that every resolution in this process agrees.
    """
    if base not in _claimed_dirs:
        for suffix in ("", *(f"-{n}" for n in range(1, 10_000))):
            candidate = Path(base + suffix)
            candidate.parent.mkdir(parents=True, exist_ok=True)
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            _claimed_dirs[base] = str(candidate)
            break
    return _claimed_dirs[base]


LATEST_RUN = Path("outputs/latest")  # -> the newest run dir under outputs/ (relative to the cwd)


LATEST_SWEEP = Path("outputs/multirun/latest")  # -> the newest sweep dir under outputs/multirun/


def point_latest(link: Path, target: Path) -> None:
    """Make `link` a symlink to `target` (replaced atomically), when `target` lies in the link's
    directory tree: `outputs/latest` follows the default run dirs, not a run put elsewhere."""
    target, home = target.resolve(), link.parent.resolve()
    if home not in target.parents:
        return
    scratch = link.with_name(f".{link.name}.{os.getpid()}")
    try:
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(target.relative_to(home), target_is_directory=True)
        os.replace(scratch, link)
    except OSError as error:  # a convenience: never a reason to stop a run
        log.warning("could not point %s at %s: %s", link, target, error)
        scratch.unlink(missing_ok=True)


def safe_name(text: str, limit: int = 200) -> str:
    """Hydra resolver for sweep job dirs: overrides as a name of [A-Za-z0-9._=,+-] only."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:limit] or "defaults"


def register_resolvers() -> None:
    """The run dir's resolvers (`unique_dir`, `safe_name`), for the CLI and the Python API alike."""
    for name, resolver in (("unique_dir", unique_dir), ("safe_name", safe_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


def chat_paths(run_dir: Path, files: Iterable[Path]) -> dict[Path, Path]:
    """Map each input file to `chats/<stem>.jsonl`; two inputs may not share a stem."""
    paths: dict[Path, Path] = {}
    owners: dict[str, Path] = {}
    problems = []
    for source in files:
        if source.stem in owners:
            problems.append(
                f"{source}: same file name as {owners[source.stem]}; both would write "
                f"chats/{source.stem}.jsonl (rename one, or run them separately)"
            )
        owners[source.stem] = source
        paths[source] = run_dir / "chats" / f"{source.stem}.jsonl"
    if problems:
        raise InputError(problems)
    return paths
