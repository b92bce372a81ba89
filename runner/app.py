"""The one orchestration of a run: validate input, load the model, replay, write, summarise."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config.schema import (
    ArchitectureConfig,
    EngineKind,
    ModelSource,
    OnError,
    RunConfig,
    config_record,
)
from runner.engines import EngineSetup, build_engine
from runner.engines.chat_model import template_supports_system_role, template_tokens
from runner.engines.protocol import Engine, Sampling
from runner.errors import InputError, Interrupted, RunInterrupted, RunnerError, raise_interrupted
from runner.inputs.conversation import Conversation
from runner.inputs.reader import read_conversations, resolve_input_files
from runner.inputs.rejects import Rejected
from runner.model import hardware as hardware_info
from runner.model import loading as model
from runner.model import sources
from runner.model.arguments import resolve_batch_size
from runner.planning import run_plan as memory
from runner.planning.plan import MemoryPlan
from runner.progress import Progress
from runner.replay import Turn, final_shape, replay_all, replies_to_generate
from runner.rundir.environment import environment, peak_rss_bytes
from runner.rundir.layout import LATEST_RUN, MANIFEST, REJECTED, chat_paths, point_latest
from runner.rundir.resume import check_resumable, completed_records, manifest, repair_order
from runner.rundir.writer import ChatWriter, RunDirLock, write_json_atomically, write_jsonl_atomically

log = logging.getLogger(__name__)

# How the memory plan's context per row was found, when the chat template measured it.
MEASURED_CONTEXT = "the longest conversation + max_new_tokens per reply"


@dataclass
class Replayed:
    """What the replay step produced: per record its turns and error code (kept ones first)."""

    records: list[tuple[tuple[Turn, ...], str | None]]
    kept: int
    seconds: float
    status: str = "completed"
    stop: BaseException | None = None
    digests: dict[Path, list[str]] = dataclasses.field(default_factory=dict)  # per chats file

    @property
    def new_turns(self) -> list[Turn]:
        return [turn for turns, _ in self.records[self.kept :] for turn in turns]


@dataclass(frozen=True)
class LoadedEngine:
    """The engine with its model loaded, and what the summary says of the loading."""

    engine: Engine
    location: str  # the checkpoint directory or hub id
    seconds: float  # from model preparation to a ready engine
    description: dict[str, Any]  # engine.describe()
    configured_batch_size: int


def run(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Replay every input conversation through the configured model into `run_dir`.

    The run dir is locked and its manifest written right after the input is read, before anything
    slow: a run stopped at any moment later can be resumed. SIGTERM and Ctrl-C at any moment end it
    with an interrupted summary and the command to resume.
    """
    started = time.perf_counter()
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupted) if in_main_thread else None
    try:
        files, conversations, rejected = _read_input(cfg)
        if cfg.plan:
            hardware, arguments = model.prepare(cfg)
            return _print_plan(cfg, run_dir, hardware, arguments.load, conversations)
        with RunDirLock(run_dir):
            paths, kept = _open_run_dir(cfg, run_dir, files, conversations)
            point_latest(LATEST_RUN, run_dir)
            if rejected and not conversations and cfg.shard.count == 1:
                _write_rejects(run_dir, rejected)
                raise RunnerError(
                    f"every line of the input was rejected ({len(rejected)}), listed in "
                    f"{run_dir / REJECTED}: nothing to replay"
                )
            try:
                return _run_locked(cfg, run_dir, files, paths, conversations, rejected, kept, started)
            except (KeyboardInterrupt, Interrupted) as stop:  # before the replay began
                summary = {
                    "status": "interrupted",
                    "records": len(kept),
                    "records_kept_from_before": len(kept),
                }
                write_json_atomically(run_dir / "summary.json", summary)
                raise _interrupted(stop, len(kept), run_dir) from None
    except (KeyboardInterrupt, Interrupted) as stop:  # before the run dir was opened
        raise _interrupted(stop, 0, run_dir) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)


def _run_locked(
    cfg: RunConfig,
    run_dir: Path,
    files: list[Path],
    paths: dict[Path, Path],
    conversations: list[Conversation],
    rejected: list[Rejected],
    kept: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    """The run once its dir is held: check the template and memory, load, replay, summarise."""
    load_start = time.perf_counter()
    hardware, arguments = model.prepare(cfg)
    if cfg.model.source is ModelSource.local:
        sources.check_local_checkpoint(Path(arguments.load["model"]))
    elif cfg.model.source is ModelSource.hub:
        sources.check_hub(arguments.load["model"], arguments.load.get("revision"))
    tokenizer = model.load_tokenizer(arguments.load)
    conversations, refused, context = _check_template(conversations, tokenizer, cfg)
    rejected += refused
    if rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in rejected])
    if rejected:
        _write_rejects(run_dir, rejected)
    architecture = memory.architecture(cfg, arguments.load)
    memory_plan = _check_memory(cfg, hardware, architecture, conversations, context)
    _log_workload(cfg, conversations, files, kept)

    setup = EngineSetup(hardware, arguments, tokenizer, memory_plan.batch_rows)
    loaded = _load_engine(cfg, setup, conversations, load_start)

    replayed = _replay(cfg, loaded.engine, conversations, paths, kept)
    summary = _summary(
        cfg, run_dir, files, paths, conversations, rejected, loaded, memory_plan, architecture, replayed
    )
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    write_json_atomically(run_dir / "summary.json", summary)
    if replayed.status == "failed":
        raise replayed.stop
    if replayed.stop is not None:
        raise _interrupted(replayed.stop, len(replayed.records), run_dir)
    _log_done(summary, replayed, run_dir)
    return summary


def _write_rejects(run_dir: Path, rejected: list[Rejected]) -> None:
    write_jsonl_atomically(run_dir / REJECTED, [reject.as_dict() for reject in rejected])
    log.warning("%d bad line(s) skipped, listed in %s", len(rejected), run_dir / REJECTED)


def _interrupted(stop: BaseException, records: int, run_dir: Path) -> RunInterrupted:
    return RunInterrupted(
        f"interrupted ({type(stop).__name__}): {records} record(s) complete in {run_dir}; "
        f"continue with the same command plus hydra.run.dir={run_dir} resume=true"
    )


def _read_input(cfg: RunConfig) -> tuple[list[Path], list[Conversation], list[Rejected]]:
    """Every input file read and validated (this shard's conversations), before the model is touched."""
    files = resolve_input_files(cfg.input.path)
    conversations, rejected = read_conversations(files, cfg.input.format, cfg.input.max_line_bytes)
    if rejected and cfg.input.on_error is OnError.fail:
        raise InputError([str(reject) for reject in rejected])
    if not conversations and not rejected:
        raise InputError([f"no conversations in {', '.join(str(path) for path in files)}"])
    if cfg.shard.count > 1:
        conversations = conversations[cfg.shard.index :: cfg.shard.count]
        log.info("shard %d of %d: %d conversation(s)", cfg.shard.index, cfg.shard.count, len(conversations))
    return files, conversations, rejected


def _open_run_dir(
    cfg: RunConfig, run_dir: Path, files: list[Path], conversations: list[Conversation]
) -> tuple[dict[Path, Path], list[dict[str, Any]]]:
    """The chat file of each input file, what an earlier session of this run left (on resume), and
    the manifest."""
    paths = chat_paths(run_dir, files)
    run_manifest = manifest(config_record(cfg), files)
    kept = _previous_records(cfg, run_dir, paths, run_manifest, conversations)
    write_json_atomically(run_dir / MANIFEST, run_manifest)
    return paths, kept


def _log_workload(
    cfg: RunConfig, conversations: list[Conversation], files: list[Path], kept: list[dict[str, Any]]
) -> None:
    log.info(
        "%d conversation(s) from %d file(s): %d replies to generate%s",
        len(conversations),
        len(files),
        _planned_replies(cfg, conversations),
        f"; resuming with {len(kept)} record(s) kept" if cfg.resume else "",
    )


def _planned_replies(cfg: RunConfig, conversations: list[Conversation]) -> int:
    return cfg.generation.num_samples * sum(replies_to_generate(c, cfg.replay.mode) for c in conversations)


def _load_engine(
    cfg: RunConfig, setup: EngineSetup, conversations: list[Conversation], load_start: float
) -> LoadedEngine:
    """Build the configured engine (it loads its model) and say what was loaded."""
    location = setup.arguments.load["model"]
    log.info("loading %s (%s) for engine=%s", cfg.model.name, location, cfg.engine.kind.value)
    chat_engine = build_engine(cfg, setup)
    loaded = LoadedEngine(
        chat_engine,
        location,
        time.perf_counter() - load_start,
        chat_engine.describe(),
        chat_engine.batch_size,
    )
    log.info(
        "loaded in %.1f s: %s, %s",
        loaded.seconds,
        loaded.description["dtype"],
        loaded.description["device_map"],
    )
    if not chat_engine.supports_system_role and any(c.messages[0].role == "system" for c in conversations):
        log.warning(
            "%s's chat template has no system role: system messages are folded into the first "
            "user turn (system text, a blank line, then the user text)",
            cfg.model.name,
        )
    return loaded


def _replay(
    cfg: RunConfig,
    chat_engine: Engine,
    conversations: list[Conversation],
    paths: dict[Path, Path],
    kept: list[dict[str, Any]],
) -> Replayed:
    """Replay into the chat files, each record appended and flushed as it completes; SIGTERM and
    Ctrl-C end it early with what is complete kept."""
    done = {(str(record["id"]), record["replay"]["sample"]) for record in kept}
    planned = _planned_replies(cfg, conversations)
    replayed = Replayed([_record_stats(record) for record in kept], len(kept), 0.0)
    start = time.perf_counter()
    try:
        # Kept turns are progress's starting count: its rates and ETA are this session's alone.
        kept_turns = sum(len(turns) for turns, _ in replayed.records)
        with (
            ChatWriter(paths) as writer,
            Progress(planned, kept_turns) as progress,
        ):
            replayed.digests = writer.digests
            source_of = {str(c.id): c.source for c in conversations}
            for record in kept:
                writer.keep(paths[source_of[str(record["id"])]], record)
            for result in replay_all(
                conversations,
                chat_engine,
                cfg.replay.mode,
                run_seed=cfg.generation.seed,
                samples=cfg.generation.num_samples,
                done=done,
                on_turn=progress.update,
                sampling=Sampling.from_config(cfg.generation),
            ):
                writer.write(result.conversation.source, result.as_record(chat_engine.chat_template_sha256))
                replayed.records.append((result.turns, result.error.code if result.error else None))
                if result.error is not None:
                    log.warning(
                        "%s (id %r): %s",
                        result.conversation.where,
                        result.conversation.id,
                        result.error.message,
                    )
    except (KeyboardInterrupt, Interrupted) as interruption:
        replayed.status, replayed.stop = "interrupted", interruption
    except Exception as error:  # the summary still says what is complete, and why the run ended
        replayed.status, replayed.stop = "failed", error
    replayed.seconds = time.perf_counter() - start
    return replayed


def _summary(
    cfg: RunConfig,
    run_dir: Path,
    files: list[Path],
    paths: dict[Path, Path],
    conversations: list[Conversation],
    rejected: list[Rejected],
    loaded: LoadedEngine,
    memory_plan: MemoryPlan,
    architecture: ArchitectureConfig,
    replayed: Replayed,
) -> dict[str, Any]:
    """summary.json: what was loaded and replayed, how it ended, how fast, and on what."""
    turns = [turn for record_turns, _ in replayed.records for turn in record_turns]
    new_turns = replayed.new_turns
    generated = sum(turn.new_tokens for turn in new_turns)
    seconds = replayed.seconds
    speed = generated / seconds if seconds else 0.0
    chat_engine = loaded.engine
    counters = chat_engine.counters()
    bandwidth = hardware_info.memory_bandwidth(loaded.description["device"], Path(cfg.cache_dir).expanduser())
    return {
        "status": replayed.status,
        "error": f"{type(replayed.stop).__name__}: {replayed.stop}" if replayed.status == "failed" else None,
        "model": {
            "name": cfg.model.name,
            "source": cfg.model.source.value,
            "location": loaded.location,
            "revision": cfg.model.revision,
        },
        "precision": cfg.precision.dtype.value,
        "quant": cfg.quant.method.value,
        "device": cfg.device.kind.value,
        "loaded": loaded.description,
        "engine": cfg.engine.kind.value,
        "batch_size": {"configured": loaded.configured_batch_size, "final": chat_engine.batch_size},
        **{key: counters.get(key) for key in ("cache", "steps", "speculative")},
        "replay_mode": cfg.replay.mode.value,
        "generation": dataclasses.asdict(cfg.generation),
        "chat_template_sha256": chat_engine.chat_template_sha256,
        "system_folded": not chat_engine.supports_system_role,
        "input_files": [str(path) for path in files],
        "chat_files": [str(path.relative_to(run_dir)) for path in dict.fromkeys(paths.values())],
        "conversations": len(conversations),
        "rejected": dict(Counter(reject.code for reject in rejected)),
        "records": len(replayed.records),
        "records_kept_from_before": replayed.kept,
        "turns": len(turns),
        "errors": dict(Counter(code for _, code in replayed.records if code is not None)),
        "prompt_tokens": sum(turn.prompt_tokens for turn in turns),
        "generated_tokens": sum(turn.new_tokens for turn in turns),
        "finish_reasons": dict(Counter(turn.finish_reason for turn in turns)),
        "load_seconds": round(loaded.seconds, 3),
        "replay_seconds": round(seconds, 3),
        "wall_seconds": None,  # set by run() as the last step
        # This session's own speed: tokens it generated over its replay time.
        "tokens_per_second": round(speed, 2),
        "turn_seconds": _percentiles(turn.seconds for turn in new_turns),
        "first_token_seconds": _percentiles(turn.first_token_seconds for turn in new_turns),
        "memory_plan": memory_plan.as_dict(),
        "roofline": _roofline(
            new_turns,
            loaded.description,
            (architecture.active_params or architecture.params) / architecture.params,
            bandwidth,
            speed,
        ),
        "peak_memory": {"rss_bytes": peak_rss_bytes(), "cuda_bytes": hardware_info.accelerator_peak_bytes()},
        "environment": {
            **environment(),
            "gpus": hardware_info.accelerator_names(),
            "torch_threads": hardware_info.torch_threads(),
        },
        # sha256 of each record's canonical JSON, in file order, as written: merge checks them.
        "record_sha256": {
            str(path.relative_to(run_dir)): digests for path, digests in replayed.digests.items() if digests
        },
    }


def _log_done(summary: dict[str, Any], replayed: Replayed, run_dir: Path) -> None:
    roofline = summary["roofline"]
    log.info(
        "roofline: %.1f GB/s over %.1f MB read per token = %.1f tokens/s at batch 1; this run %.1f "
        "tokens/s, %.0f%% of it",
        roofline["memory_bandwidth_bytes_per_second"] / 1e9,
        roofline["bytes_per_token"] / 1e6,
        roofline["batch1_tokens_per_second"],
        summary["tokens_per_second"],
        100 * roofline["fraction"],
    )
    if summary["speculative"]:
        speculative = summary["speculative"]
        log.info(
            "speculative decoding (%s): %.0f%% of %d drafted tokens accepted, %.2f tokens per forward pass",
            speculative["method"],
            100 * speculative["acceptance_rate"],
            speculative["drafted_tokens"],
            speculative["tokens_per_forward_pass"],
        )
    log.info(
        "done: %d conversation(s), %d turn(s) (finish reasons: %s), errors: %s, rejected lines: %s; "
        "%d new tokens in %.1f s (%.1f tokens/s)",
        summary["conversations"],
        summary["turns"],
        _counts(summary["finish_reasons"]),
        _counts(summary["errors"]),
        _counts(summary["rejected"]),
        sum(turn.new_tokens for turn in replayed.new_turns),
        summary["replay_seconds"],
        summary["tokens_per_second"],
    )
    log.info("outputs: %s", run_dir)
    log.info("read them: python -m runner.view %s", run_dir)


def _counts(counts: dict[str, int]) -> str:
    """'length 5, eos 4' (largest first), or 'none'."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{key} {count}" for key, count in ordered) or "none"


def _previous_records(
    cfg: RunConfig,
    run_dir: Path,
    paths: dict[Path, Path],
    run_manifest: dict[str, Any],
    conversations: list[Conversation],
) -> list[dict[str, Any]]:
    """What an interrupted run left, when resuming (each record once, in input order); refuse to
    write over a run otherwise."""
    existing = [path for path in dict.fromkeys(paths.values()) if path.exists()]
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if not cfg.resume and restarts and (run_dir / MANIFEST).exists():
        log.info("SLURM requeued this job (restart %d): resuming its run dir %s", restarts, run_dir)
    elif not cfg.resume:
        if existing or (run_dir / MANIFEST).exists():
            raise RunnerError(
                f"{run_dir} already holds a run: add resume=true to continue it, or pick a new hydra.run.dir"
            )
        return []
    if not (run_dir / MANIFEST).exists():
        if existing:
            raise RunnerError(f"{run_dir} holds chats but no {MANIFEST}: cannot tell which run wrote them")
        log.info("resume=true: %s holds no records yet, so the run starts from the beginning", run_dir)
        return []
    check_resumable(run_dir, run_manifest)
    samples = cfg.generation.num_samples
    order = {(str(c.id), s): i * samples + s for i, c in enumerate(conversations) for s in range(samples)}
    return [record for path in existing for record in repair_order(path, completed_records(path), order)]


def _record_stats(record: dict[str, Any]) -> tuple[tuple[Turn, ...], str | None]:
    """The turns and error code of a record written by an earlier session of this run."""
    replay = record["replay"]
    turns = tuple(Turn(**{key: turn[key] for key in Turn.__dataclass_fields__}) for turn in replay["turns"])
    return turns, replay["error"]["code"] if replay["error"] else None


def _check_memory(
    cfg: RunConfig,
    hardware: hardware_info.Hardware,
    architecture: ArchitectureConfig,
    conversations: list[Conversation],
    context: int,
) -> MemoryPlan:
    """The memory plan, before any weights load: refuse a run that cannot fit, shrink an auto batch
    that would not, and warn of CPU offload."""
    if (
        cfg.generation.speculation
        and cfg.engine.kind is not EngineKind.pipeline
        and cfg.engine.batch_size != 1
    ):
        log.warning(
            "speculative decoding (%s): transformers drafts for one sequence at a time, so this run "
            "uses batch size 1 (engine.batch_size=%s)",
            cfg.generation.speculation,
            cfg.engine.batch_size,
        )
    rows = _batch_rows(cfg, hardware, conversations)
    plan = memory.memory_plan(cfg, hardware, architecture, rows, context, MEASURED_CONTEXT)
    if plan.fitting_batch is not None and cfg.engine.batch_size == "auto":
        log.info("engine.batch_size=auto: %d rows would not fit, using %d", rows, plan.fitting_batch)
        plan = memory.memory_plan(cfg, hardware, architecture, plan.fitting_batch, context, MEASURED_CONTEXT)
    for line in plan.lines():
        log.info("%s", line)
    if not plan.fits:
        raise RunnerError(plan.refusal())
    if plan.verdict == "fits_with_offload":
        log.warning("%s", plan.verdict_text())
    return plan


def _print_plan(
    cfg: RunConfig,
    run_dir: Path,
    hardware: hardware_info.Hardware,
    load: dict[str, Any],
    conversations: list[Conversation],
) -> dict[str, Any]:
    """plan=true: print the memory plan (and write plan.json); load no weights, generate nothing."""
    try:  # the tokenizer measures the conversations; a hub model's is used only if already cached
        tokenizer = model.load_tokenizer(load, local_files_only=cfg.model.source is ModelSource.hub)
    except RunnerError:
        tokenizer = None
    if tokenizer is not None:
        conversations, _, context = _check_template(conversations, tokenizer, cfg)
        context_from = MEASURED_CONTEXT
    else:
        context = max((_estimated_length(c, cfg) for c in conversations), default=0)
        context_from = "estimated as characters / 3 + max_new_tokens per reply"
    rows = _batch_rows(cfg, hardware, conversations)
    plan = memory.memory_plan(cfg, hardware, memory.architecture(cfg, load), rows, context, context_from)
    print("\n".join(plan.lines()))
    write_json_atomically(run_dir / "plan.json", plan.as_dict())
    return plan.as_dict()


def _batch_rows(cfg: RunConfig, hardware: hardware_info.Hardware, conversations: list[Conversation]) -> int:
    """The batch the engine will run: the configured size, at most one row per conversation sample."""
    streams = len(conversations) * cfg.generation.num_samples
    return max(1, min(resolve_batch_size(cfg, hardware), streams))


def _estimated_length(conversation: Conversation, cfg: RunConfig) -> int:
    """A conversation's final length in tokens without a tokenizer: characters / 3 (English runs
    near 4 a token), a few tokens of template per message, max_new_tokens per reply."""
    messages = final_shape(conversation, cfg.replay.mode, fold=False)
    replies = replies_to_generate(conversation, cfg.replay.mode)
    return sum(len(m.content) // 3 + 8 for m in messages) + replies * cfg.generation.max_new_tokens


def _check_template(
    conversations: list[Conversation], tokenizer: Any, cfg: RunConfig
) -> tuple[list[Conversation], list[Rejected], int]:
    """Render each conversation's final shape with the chat template once: refusals become
    rejects, and the longest rendering plus max_new_tokens per reply to generate is the context
    the memory plan reserves per row."""
    fold = not template_supports_system_role(tokenizer)
    accepted, refused, longest = [], [], 0
    for conversation in conversations:
        tokens = template_tokens(tokenizer, final_shape(conversation, cfg.replay.mode, fold=fold))
        if isinstance(tokens, int):
            accepted.append(conversation)
            replies = replies_to_generate(conversation, cfg.replay.mode)
            longest = max(longest, tokens + replies * cfg.generation.max_new_tokens)
            continue
        message = f"the model's chat template refuses this conversation: {tokens}"
        refused.append(
            Rejected.of(
                conversation.source, conversation.line, conversation.id, "template_error", message, b""
            )
        )
    return accepted, refused, longest


def _roofline(
    turns: list[Turn], loaded: dict[str, Any], active: float, bandwidth: float, speed: float
) -> dict[str, float]:
    """Decoding reads the active weights (`active` of them: a mixture of experts reads the experts
    it routes to) and the whole KV cache once per step: at batch 1 that bounds the speed at
    bandwidth / bytes per token. The KV part uses the mean context over generated tokens."""
    generated = sum(turn.new_tokens for turn in turns)
    context = (
        sum(t.new_tokens * (t.prompt_tokens + t.new_tokens / 2) for t in turns) / generated
        if generated
        else 0
    )
    per_token = active * loaded["weights_bytes"] + loaded["kv_bytes_per_token"] * context
    batch1 = bandwidth / per_token
    return {
        "memory_bandwidth_bytes_per_second": round(bandwidth),
        "bytes_per_token": round(per_token),
        "batch1_tokens_per_second": round(batch1, 2),
        "fraction": round(speed / batch1, 4),
    }


def _percentiles(values: Iterable[float]) -> dict[str, float | None]:
    """p50 and p95 (nearest rank) of per-turn timings; None when there are no turns."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None}
    return {f"p{q}": round(ordered[math.ceil(q / 100 * len(ordered)) - 1], 4) for q in (50, 95)}
