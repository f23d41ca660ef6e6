"""The /retrieve request and its checks: every refusal names the field at fault (HTTP 4xx, never a crash)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from components.serving.settings import ServeSettings
from components.serving.traffic import variant_for

ITEM_EXTRA_FIELDS = ("text",)      # what "fields" may ask to add to each answered item


def _unicode(value: str) -> str:
    """JSON's \\ud800 escape gives a lone surrogate, which no UTF-8 answer, log line or encoder can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("unicode", "must be valid Unicode text (a lone surrogate such as \\ud800 at "
                                             "character {position})", {"position": exc.start}) from None
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode)]


class RetrieveRequest(BaseModel):
    """Exactly one of text / history (item ids, oldest first); the rest is optional."""

    model_config = ConfigDict(extra="forbid")

    text: Text | None = None
    history: list[Text] | None = None
    k: StrictInt | None = None
    beam: StrictInt | None = None
    user_id: Text | None = None            # A/B assignment key (stable per user); request_id when absent
    request_id: Text | None = None         # echoed, logged as query_id; generated when absent
    exclude_history: StrictBool | None = None   # drop the history's own items (serve.exclude_history when absent)
    fields: list[Literal[ITEM_EXTRA_FIELDS]] | None = None   # extra per-item fields: "text"


class RequestError(ValueError):
    """A request the service refuses, with the field to name in the answer."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.message, self.status = field, message, status
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class Job:
    """A checked request: what the engine decodes, on which slot."""

    request_id: str
    user_id: str | None
    variant: str
    text: str | None
    history: tuple[str, ...]
    k: int
    beam: int
    exclude_history: bool = False
    fields: tuple[str, ...] = ()        # ITEM_EXTRA_FIELDS asked for, in the request's order


def _bounded(value: int | None, default: int, high: int, field: str) -> int:
    if value is None:
        return default
    if not 1 <= value <= high:   # value has at most MAX_INT_DIGITS digits (app.read_body): short enough to show
        raise RequestError(field, f"must be between 1 and {high}, got {value}")
    return value


def check_request(req: RetrieveRequest, settings: ServeSettings) -> Job:
    """Bounds and shape of a parsed request; item ids are checked later, against the version that answers."""
    text = req.text if req.text is not None and req.text.strip() else None
    history = tuple(req.history or ())
    if req.text is not None and req.history is not None:
        raise RequestError("text", "give either text or history, not both")
    if req.text is not None and text is None:
        raise RequestError("text", "must not be empty")
    if req.history is not None and not history:
        raise RequestError("history", "must hold at least one item id")
    if text is None and not history:
        raise RequestError("text", "give a query: text (a string) or history (a list of item ids)")
    if text is not None and len(text) > settings.max_text_chars:
        raise RequestError("text", f"at most {settings.max_text_chars} characters, got {len(text)}", 413)
    if len(history) > settings.max_history_items:
        raise RequestError("history", f"at most {settings.max_history_items} item ids, got {len(history)}", 413)
    if any(not item.strip() for item in history):
        raise RequestError("history", "item ids must be non-empty strings")
    k = _bounded(req.k, settings.k_default, settings.k_max, "k")
    beam = _bounded(req.beam, settings.beam_default, settings.beam_max, "beam")
    request_id = req.request_id or uuid.uuid4().hex
    variant = variant_for(req.user_id or request_id, settings.ab_share) if settings.ab_out_dir else "A"
    exclude = settings.exclude_history if req.exclude_history is None else req.exclude_history
    fields = tuple(dict.fromkeys(req.fields or ()))
    return Job(request_id, req.user_id, variant, text, history, k, beam, exclude, fields)
