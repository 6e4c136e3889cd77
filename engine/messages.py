"""The messages between the API process and the engine core process (no torch).

API -> core, one per ZeroMQ message: `AddRequest`, `AbortRequests`, `UtilityCall`.
Core -> API, one `CoreOutputs` per loop turn that has something to say (admissions, request outputs,
utility results, a statistics snapshot), or `CoreFailed` once, as the core's last word.
Start-up (whether the engine could be built, and its resolved limits) goes over a pipe instead:
`EngineReady` or `CoreFailed`, pickled, since it carries no request traffic.

Everything here and everything reachable from these fields is encoded by `engine.ipc.Codec`
(`CODEC_ROOTS`); errors cross as `RemoteError` and are raised again on the API side as the same
class when it is one of `REMOTE_ERRORS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.client import EngineDead, UtilityError
from engine.config import DiffusionDefaults
from engine.engine_config import EngineConfig
from engine.lora.errors import LoRAError, UnknownLoRA
from engine.request import InvalidParams, RequestOutput, SamplingParams
from engine.scheduler import QueueFull
from engine.snapshot import EngineSnapshot

REMOTE_ERRORS: dict[str, type[Exception]] = {
    kind.__name__: kind
    for kind in (
        InvalidParams,
        QueueFull,
        EngineDead,
        UtilityError,
        LoRAError,
        UnknownLoRA,
        ValueError,
        TypeError,
        KeyError,
    )
}
"""Exceptions raised again as themselves on the API side; any other arrives as a RuntimeError."""


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in the engine core, for the caller on the API side."""

    kind: str
    message: str
    param: str | None = None
    """`InvalidParams.param`: the request field at fault."""

    @classmethod
    def of(cls, error: BaseException) -> RemoteError:
        return cls(type(error).__name__, str(error), getattr(error, "param", None))

    def exception(self) -> Exception:
        """The error to raise on the API side."""
        kind = REMOTE_ERRORS.get(self.kind)
        if kind is InvalidParams:
            return InvalidParams(self.message, self.param)
        if kind is not None:
            return kind(self.message)
        return RuntimeError(f"{self.kind} in the engine core: {self.message}")


@dataclass(frozen=True)
class AddRequest:
    """Admit a request; the core answers with an `Admission` of the same id."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | None
    want_canvas: bool
    arrival_time: float
    """`time.monotonic()` when the API received it, so queue time includes the trip."""
    lora_name: str | None = None
    """The adapter the request picks (None: the base model)."""


@dataclass(frozen=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(frozen=True)
class UtilityCall:
    """Call the engine's public method `method(*args)`; answered by a `UtilityResult` of `call_id`."""

    call_id: int
    method: str
    args: list[Any]
    """Plain values or registered contract types."""


@dataclass(frozen=True)
class Admission:
    request_id: str
    error: RemoteError | None = None
    """Why it was refused; None: admitted."""


@dataclass(frozen=True)
class UtilityResult:
    call_id: int
    result: Any = None
    error: RemoteError | None = None


@dataclass(frozen=True)
class CoreOutputs:
    """Everything one turn of the core loop has for the API side, applied in field order."""

    snapshot: EngineSnapshot | None = None
    admissions: list[Admission] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    """Request outputs without text: the API side detokenises."""
    results: list[UtilityResult] = field(default_factory=list)


@dataclass(frozen=True)
class CoreFailed:
    """The core cannot go on (or could not start): every request fails with this message."""

    message: str


@dataclass(frozen=True)
class EngineReady:
    """The engine is built: its resolved limits and defaults, for the API side."""

    config: EngineConfig
    defaults: DiffusionDefaults
    max_model_len: int


CODEC_ROOTS = (AddRequest, AbortRequests, UtilityCall, CoreOutputs, CoreFailed, EngineReady)
"""The types `engine.ipc.Codec` must know: these and everything reachable from their fields."""
