"""Typed run configuration: one dataclass per config group, registered in Hydra's ConfigStore.

Every YAML under conf/ starts from its group's schema, so an unknown key or a wrong type fails at
compose time; cross-field rules live in `__post_init__` and fail in `to_run_config`. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from runner.errors import ConfigError


class ModelSource(Enum):
    embedded = "embedded"  # a GGUF shipped inside a Python package, converted once into a cache
    hub = "hub"  # a Hugging Face hub repository id (+ revision)
    local = "local"  # a directory holding a transformers checkpoint
    server = "server"  # a name an OpenAI-compatible server knows (engine=openai)


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that supports it, else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class QuantMethod(Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class Int4Type(Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class DeviceKind(Enum):
    auto = "auto"  # device_map="auto": GPUs first, then CPU
    cpu = "cpu"
    cuda = "cuda"


class EngineKind(Enum):
    # Each value names its module, runner/engines/<value>.py, which builds the engine.
    continuous = "continuous"  # step-level batching over KV-cache slots, turns joining at any step
    pipeline = "pipeline"  # TextGenerationPipeline, one turn per call (the reference engine)
    vllm = "vllm"  # vLLM's engine through its step API (GPUs, tensor/pipeline parallel, clusters)
    openai = "openai"  # any OpenAI-compatible server's /v1/chat/completions (or one it starts itself)


class ExecutorBackend(Enum):
    mp = "mp"  # one node: a process per GPU
    ray = "ray"  # several nodes: a Ray cluster the user starts


class InputFormat(Enum):
    auto = "auto"  # detected per line from its keys
    messages = "messages"  # OpenAI: {"id", "messages": [{"role", "content"}]}
    sharegpt = "sharegpt"  # ShareGPT: {"id", "conversations": [{"from", "value"}]}
    turns = "turns"  # MT-bench: {"question_id", "turns": [user turn, ...]}
    openai_batch = "openai_batch"  # OpenAI Batch API requests: {"custom_id", "body": {"messages", ...}}


class OnError(Enum):
    fail = "fail"  # list every bad line, exit 1, generate nothing
    skip = "skip"  # bad lines go to rejected.jsonl; every good conversation is replayed


class ReplayMode(Enum):
    regenerate = "regenerate"  # the model's own replies form the history; input replies are references
    gold_history = "gold_history"  # input replies stay in the history; only unanswered turns generate


@dataclass
class ArchitectureConfig:
    """What the memory plan needs to know of a model without its weights (see runner/plan.py)."""

    params: int = MISSING  # all parameters
    active_params: int | None = None  # read per token, for mixture-of-experts models (None: all)
    hidden_size: int = MISSING
    layers: int = MISSING
    kv_heads: int = MISSING  # key/value heads (fewer than query heads under grouped-query attention)
    head_dim: int = MISSING
    context_length: int = MISSING
    vocab_size: int = MISSING
    tied_embeddings: bool = False  # lm_head shares the input embedding matrix

    def __post_init__(self) -> None:
        if not 0 < (self.active_params or self.params) <= self.params:
            raise ConfigError("model.architecture.active_params must be in (0, params]")


@dataclass
class ModelConfig:
    name: str = MISSING
    source: ModelSource = MISSING
    id: str | None = None
    revision: str | None = None
    path: str | None = None
    package: str | None = None
    trust_remote_code: bool = False
    # Presets of hub models record it; embedded and local models are read from their config.json.
    architecture: ArchitectureConfig | None = None

    def __post_init__(self) -> None:
        required = {
            ModelSource.hub: "id",
            ModelSource.server: "id",
            ModelSource.local: "path",
            ModelSource.embedded: "package",
        }[self.source]
        if not getattr(self, required):
            raise ConfigError(
                f"model '{self.name}' has source={self.source.value} but no {required}: "
                f"set model.{required}=... ({_SOURCE_KEYS[required]})"
            )
        # A key of another source would be silently ignored: say which preset the user meant.
        for key, owner in _SOURCE_KEYS.items():
            belongs_here = key == required or (key == "revision" and self.source is ModelSource.hub)
            if getattr(self, key) and not belongs_here:
                raise ConfigError(
                    f"model.{key} does not apply to model '{self.name}' (source={self.source.value}): "
                    f"it is for {owner}"
                )


_SOURCE_KEYS = {
    "id": "model=hub model.id=<org>/<name>, or model=server model.id=<the name a server knows>",
    "revision": "model=hub, to pin a commit",
    "path": "model=local model.path=<checkpoint dir>",
    "package": "source=embedded, a Python package holding a .gguf",
}


@dataclass
class PrecisionConfig:
    dtype: Precision = MISSING


@dataclass
class QuantConfig:
    method: QuantMethod = MISSING
    quant_type: Int4Type = Int4Type.nf4
    double_quant: bool = True
    compute_dtype: Precision = Precision.auto


@dataclass
class DeviceConfig:
    kind: DeviceKind = MISSING
    max_memory: dict[Any, str] = field(default_factory=dict)  # GPU index or "cpu" -> "70GiB"

    def __post_init__(self) -> None:
        if self.kind is DeviceKind.cpu and self.max_memory:
            raise ConfigError("device.max_memory applies to device=auto or device=cuda, not device=cpu")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0
    num_samples: int = 1
    prompt_lookup_num_tokens: int = 0  # > 0: prompt lookup decoding, drafting up to N tokens per step
    assistant_model: str | None = None  # a conf/model preset: a small draft model sharing the tokenizer

    @property
    def speculation(self) -> str | None:
        """The speculative decoding method in use, if any."""
        if self.prompt_lookup_num_tokens:
            return "prompt_lookup"
        return "assistant_model" if self.assistant_model else None

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1"),
            (
                0 <= self.min_new_tokens <= self.max_new_tokens,
                "generation.min_new_tokens must be between 0 and generation.max_new_tokens",
            ),
            (self.temperature > 0, "generation.temperature must be > 0"),
            (0 < self.top_p <= 1, "generation.top_p must be in (0, 1]"),
            (self.top_k >= 0, "generation.top_k must be >= 0 (0 disables it)"),
            (self.repetition_penalty > 0, "generation.repetition_penalty must be > 0"),
            (self.num_samples >= 1, "generation.num_samples must be >= 1"),
            (
                self.num_samples == 1 or self.do_sample,
                "generation.num_samples > 1 gives identical copies under greedy decoding: "
                "use generation=sampling",
            ),
            (self.prompt_lookup_num_tokens >= 0, "generation.prompt_lookup_num_tokens must be >= 0 (0: off)"),
            (
                not (self.prompt_lookup_num_tokens and self.assistant_model),
                "generation.prompt_lookup_num_tokens and generation.assistant_model are two ways to draft "
                "tokens: set one of them",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class EngineConfig:
    kind: EngineKind = MISSING
    batch_size: Any = "auto"  # turns in flight at once (KV-cache slots): an integer >= 1, or "auto"
    prefill_chunk: int = 512  # prompt tokens prefilled per step at most (continuous engine)

    def __post_init__(self) -> None:
        size = self.batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"engine.batch_size must be an integer >= 1 or auto, got {size!r}")
        if self.prefill_chunk < 1:
            raise ConfigError("engine.prefill_chunk must be >= 1")


@dataclass
class ContinuousEngineConfig(EngineConfig):
    """engine=continuous: the runner's own step-level engine."""

    # Decode steps replayed as CUDA graphs, one per bucketed batch size (CUDA only; off until a
    # GPU run has verified it: see the README).
    cuda_graphs: bool = False
    # The most the KV cache may hold, in GB (10^9 bytes): turns wait to join beyond it. auto: on a
    # CPU half the RAM the weights leave free (running out of RAM ends the process, not a pass), no
    # limit on a GPU (a pass that runs out of memory backs off); null: no limit.
    kv_cache_gb: Any = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.kv_cache_gb
        number = isinstance(size, int | float) and not isinstance(size, bool)
        if size not in ("auto", None) and not (number and size > 0):
            raise ConfigError(f"engine.kv_cache_gb must be a number > 0, auto or null, got {size!r}")


@dataclass
class VllmEngineConfig(EngineConfig):
    """engine=vllm: vLLM's own settings beside batch_size (its max running sequences)."""

    tensor_parallel_size: int = 1  # GPUs each layer is split over (a node's GPUs)
    pipeline_parallel_size: int = 1  # stages the layers are split into (nodes, with ray)
    gpu_memory_utilization: float = 0.9  # the share of each GPU vLLM takes for weights and KV cache
    max_model_len: int | None = None  # context per sequence (None: the model's); longer prompts fail
    enforce_eager: bool = False  # no CUDA graphs
    distributed_executor_backend: ExecutorBackend = ExecutorBackend.mp

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.tensor_parallel_size >= 1, "engine.tensor_parallel_size must be >= 1"),
            (self.pipeline_parallel_size >= 1, "engine.pipeline_parallel_size must be >= 1"),
            (0 < self.gpu_memory_utilization <= 1, "engine.gpu_memory_utilization must be in (0, 1]"),
            (self.max_model_len is None or self.max_model_len >= 1, "engine.max_model_len must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class OpenAIEngineConfig(EngineConfig):
    """engine=openai: an OpenAI-compatible server's address, how hard to press it, and, with
    `serve`, the command that starts the server for this run."""

    base_url: str | None = None  # the server's /v1 root; null with `serve` (the runner's own server)
    api_key_env: str | None = None  # the NAME of an environment variable holding the key, never the key
    concurrency: int = 8  # requests in flight at once
    timeout_s: float = 600.0  # one request's limit; past it the request is retried
    max_retries: int = 5  # per request, for 429, 5xx, dropped connections and timeouts
    requests_per_minute: float | None = None  # client-side limits, for hosted APIs
    tokens_per_minute: float | None = None
    serve: str | None = None  # a command with {port} and {model}: the server this run starts and stops
    serve_timeout_s: float = 900.0  # how long the started server may take to answer
    extra_body: dict[str, Any] = field(default_factory=dict)  # fields added to every request, as they are

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("concurrency", "timeout_s", "requests_per_minute", "tokens_per_minute", "serve_timeout_s")
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"engine.{key} must be > 0, got {value}")
        checks = [
            (self.max_retries >= 0, "engine.max_retries must be >= 0"),
            (
                self.batch_size == "auto",
                "engine=openai sends engine.concurrency requests at once: set engine.concurrency, not "
                "engine.batch_size",
            ),
            (
                (self.base_url is None) != (self.serve is None),
                "engine=openai needs one of engine.base_url (a running server's /v1 root) or "
                "engine.serve (a command that starts one, with {port} and {model})",
            ),
            (
                self.serve is None or "{port}" in self.serve,
                "engine.serve must place the port the runner picks: put {port} in the command",
            ),
            (
                self.api_key_env is None or self.api_key_env.replace("_", "").isalnum(),
                "engine.api_key_env is the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                "not the key itself",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class InputConfig:
    path: Any = MISSING  # a file, directory or glob, or a list of them
    format: InputFormat = InputFormat.auto
    on_error: OnError = OnError.fail
    max_line_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        paths = [self.path] if isinstance(self.path, str) else self.path
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"input.path must be a path, a glob, or a list of them; got {self.path!r}")
        if self.max_line_bytes < 1:
            raise ConfigError("input.max_line_bytes must be >= 1")


@dataclass
class ReplayConfig:
    mode: ReplayMode = ReplayMode.regenerate


@dataclass
class ShardConfig:
    index: int = 0  # this job's shard, 0 <= index < count
    count: int = 1  # conversation i (input order) belongs to shard i % count

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(
                f"shard.index must be in [0, shard.count); got index {self.index}, count {self.count}"
            )


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    precision: PrecisionConfig = MISSING
    quant: QuantConfig = MISSING
    device: DeviceConfig = MISSING
    generation: GenerationConfig = MISSING
    engine: EngineConfig = MISSING
    input: InputConfig = field(default_factory=InputConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    cache_dir: str = MISSING
    resume: bool = False
    plan: bool = False  # print the memory plan and exit, loading no weights
    plan_gpus: list[str] = field(
        default_factory=list
    )  # plan for these GPUs ("80GB") instead of this machine's

    def __post_init__(self) -> None:
        if self.plan_gpus and not self.plan:
            raise ConfigError("plan_gpus describes GPUs to plan for, without using them: add plan=true")
        if self.engine.kind is EngineKind.openai:
            self._check_remote()
        elif self.model.source is ModelSource.server:
            raise ConfigError(
                f"model={self.model.name} is a name a server knows, with no weights here: add "
                "engine=openai with engine.base_url=<its /v1 root>"
            )

    def _check_remote(self) -> None:
        """engine=openai runs the model on a server: what sets up local weights does not apply."""
        local = [
            f"{group}={value.value}"
            for group, value, default in (
                ("precision", self.precision.dtype, Precision.auto),
                ("quant", self.quant.method, QuantMethod.none),
                ("device", self.device.kind, DeviceKind.auto),
            )
            if value is not default
        ]
        if self.device.max_memory:
            local.append("device.max_memory")
        if self.generation.speculation:
            local.append("generation.prompt_lookup_num_tokens / generation.assistant_model")
        if self.plan_gpus:
            local.append("plan_gpus")
        if local:
            raise ConfigError(
                f"engine=openai runs the model on a server, so {', '.join(local)} cannot apply here: drop "
                "it, or set it on the server (e.g. vllm serve --dtype bfloat16 --quantization fp8)"
            )


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "precision": PrecisionConfig,
    "quant": QuantConfig,
    "device": DeviceConfig,
    "generation": GenerationConfig,
    "engine": EngineConfig,
}


# Engines with settings of their own: their YAML starts from `<engine>_engine_schema`.
ENGINE_SCHEMAS = {
    "continuous": ContinuousEngineConfig,
    "vllm": VllmEngineConfig,
    "openai": OpenAIEngineConfig,
}


def register_configs() -> None:
    """Store the schemas so that conf/ YAMLs can name them in their defaults lists
    (`- /model_schema@_here_`). They are stored outside the groups, so that `--help` and a
    mistyped option (`model=lama3`) do not offer them as options."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=RunConfig)
    for group, schema in GROUP_SCHEMAS.items():
        store.store(name=f"{group}_schema", node=schema)
    for engine, schema in ENGINE_SCHEMAS.items():
        store.store(name=f"{engine}_engine_schema", node=schema)


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """The run config as plain JSON data (what resume compares; `resume` itself left out)."""
    record = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    del record["resume"], record["plan"], record["plan_gpus"]
    return record
