"""Structured-output request fields, as OpenAI and vLLM spell them, turned into an engine `GrammarSpec`.

- OpenAI: `response_format` {"type": "json_schema", "json_schema": {"name", "schema", "strict"}},
  {"type": "json_object"} or {"type": "text"} (no constraint).
- vLLM: `structured_outputs` with exactly one of `json` (a schema), `regex`, `choice`, `grammar` (EBNF).

The engine compiles the spec and refuses what it cannot enforce (a 400 naming it).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.request import GrammarSpec


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """The JSON schema the output must validate against (absent: any JSON object)."""
    strict: bool | None = None
    """Accepted for compatibility: outputs always follow the schema."""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('response_format of type "json_schema" needs a json_schema object')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs: exactly one of the constraints."""

    model_config = ConfigDict(extra="allow")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [v for v in (self.json_, self.regex, self.choice, self.grammar) if v is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar")
        return self


def grammar_spec(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> GrammarSpec | None:
    """The engine's view of the request's constraint; None when it has none. Raises ValueError when both
    fields constrain the output."""
    from_format = _from_response_format(response_format)
    from_structured = _from_structured_outputs(structured)
    if from_format is not None and from_structured is not None:
        raise ValueError("give either response_format or structured_outputs, not both")
    return from_format or from_structured


def _from_response_format(response_format: ResponseFormat | None) -> GrammarSpec | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec("json_object")
    assert response_format.json_schema is not None
    schema = response_format.json_schema.schema_
    return GrammarSpec("json_object") if schema is None else GrammarSpec("json_schema", json.dumps(schema))


def _from_structured_outputs(structured: StructuredOutputs | None) -> GrammarSpec | None:
    if structured is None:
        return None
    if structured.json_ is not None:
        schema = structured.json_
        return GrammarSpec("json_schema", schema if isinstance(schema, str) else json.dumps(schema))
    if structured.regex is not None:
        return GrammarSpec("regex", structured.regex)
    if structured.choice is not None:
        return GrammarSpec("choice", json.dumps(structured.choice))
    assert structured.grammar is not None
    return GrammarSpec("grammar", structured.grammar)
