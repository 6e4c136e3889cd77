"""msgpack encoding of the engine's frozen contracts, for the channel between API and engine core.

Generic by construction: msgspec encodes a dataclass as a map of its field names to their values and
decodes it back by the annotations, recursively, so a field added to a contract (a usage counter, a
logprobs list, a grammar spec in `SamplingParams`) crosses the process boundary with no change here,
as long as its annotation says what it holds (`tuple[int, ...]` comes back a tuple, a nested
dataclass a dataclass; a field annotated `Any` comes back as plain msgpack values).

What may travel is closed: a message is one of the registered root types (`Codec(roots)`), sent as
`[type name, payload]`; a name outside the registry is refused (`CodecError`) rather than built, and
the payload must match the type's annotations (msgspec checks as it decodes). Decoding runs each
dataclass's `__post_init__`, so a contract's own checks hold on the receiving side too.

msgspec knows no `deque` (the record queues of `EngineStats`): one travels as an array and comes
back a deque, without its `maxlen`.
"""

from __future__ import annotations

import typing
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec


class CodecError(ValueError):
    """A value cannot be encoded (not a registered message) or a message cannot be decoded."""


class Codec:
    """Encodes and decodes the messages of the registered root types (one codec per thread)."""

    def __init__(self, roots: Iterable[type]) -> None:
        self.types: dict[str, type] = {}
        for kind in roots:
            if self.types.setdefault(kind.__qualname__, kind) is not kind:
                raise CodecError(f"two message types are named {kind.__qualname__}")
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
        self._decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
            name: msgspec.msgpack.Decoder(kind, dec_hook=_dec_hook) for name, kind in self.types.items()
        }

    def encode(self, message: Any) -> bytes:
        """`message` as bytes; raises `CodecError` unless it is one of the registered types."""
        name = type(message).__qualname__
        if self.types.get(name) is not type(message):
            raise CodecError(f"{type(message).__name__} is not a registered message type")
        try:
            return self._encoder.encode((name, message))
        except (TypeError, ValueError, OverflowError) as error:
            raise CodecError(f"cannot encode {name}: {error}") from error

    def decode(self, data: bytes) -> Any:
        """The message `encode` was given; raises `CodecError` for bytes this codec cannot read."""
        try:
            name, payload = self._envelope.decode(data)
        except msgspec.DecodeError as error:
            raise CodecError(f"not a message: {error}") from error
        decoder = self._decoders.get(name)
        if decoder is None:
            raise CodecError(f"{name!r} is not a registered message type")
        try:
            return decoder.decode(payload)
        except (msgspec.DecodeError, TypeError, ValueError) as error:
            raise CodecError(f"cannot decode {name}: {error}") from error


def _enc_hook(value: Any) -> Any:
    if isinstance(value, deque):
        return list(value)
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} cannot be encoded")


def _dec_hook(kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is deque:
        (item,) = typing.get_args(kind) or (Any,)
        return deque(msgspec.convert(value, list[item], dec_hook=_dec_hook))  # type: ignore[valid-type]
    raise TypeError(f"{kind} cannot be decoded")
