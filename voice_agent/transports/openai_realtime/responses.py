"""Native replies -> GA responses (pure).

One native reply (reply.started ... reply.done | reply.cancelled | error with
its reply_id) is one GA response with one assistant message item and one
content part:

    reply.started   -> response.created, response.output_item.added,
                       conversation.item.added, response.content_part.added
    reply.delta     -> response.output_text.delta (text output) or
                       response.output_audio_transcript.delta (audio output)
    spoken PCM      -> response.output_audio.delta (base64, output format)
    reply.done      -> (audio output: once the reply's audio has all gone
                       out, reply.audio.done or `settled`) response.output_
                       {text|audio_transcript}.done [+ output_audio.done],
                       response.content_part.done, response.output_item.done,
                       conversation.item.done, response.done (completed, with
                       usage), rate_limits.updated
    reply.cancelled -> the same closing events at once, status cancelled
                       (reason turn_detected for a barge-in, client_cancelled)
    error(reply_id) -> the same, status failed (status_details.error)

An out-of-band response (response.create with conversation "none") sends
the same response.* events with conversation_id null, and its item never
joins the conversation (no conversation.item.* events; it cannot be
retrieved, truncated or deleted).

conversation.item.truncate and .delete of the model's last reply cut the
model's history too (history.py): TruncateReply(tokens heard), queued at
once (the engine applies it after the reply's turn has settled, a cancel
first), so it keeps its place among later edits and turns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from voice_agent.engine.types import TruncateReply
from voice_agent.errors import InvalidField, NoActiveResponse
from voice_agent.transports.openai_realtime.calls import Cancel, CancelAside, Edit, Out, StopAudio
from voice_agent.transports.openai_realtime.codec import format_object
from voice_agent.transports.openai_realtime.events import ItemTruncate
from voice_agent.transports.openai_realtime.history import ModelHistory, heard_tokens
from voice_agent.transports.openai_realtime.items import Ids, Items

_REASONS = {"barge_in": "turn_detected", "client": "client_cancelled", "continued": "turn_detected"}
FINISHED_KEPT = 32  # finished responses kept for conversation.item.truncate


@dataclass
class Response:
    id: str
    reply_id: str
    item_id: str
    audio: bool  # audio output (audio deltas + transcript)
    modalities: tuple[str, ...]
    max_output_tokens: int | None
    metadata: dict[str, Any] | None
    text: str = ""
    text_done: bool = False
    audio_done: bool = False
    usage: dict[str, Any] = field(default_factory=dict)
    audio_ms: float = 0.0  # audio sent so far
    truncated: bool = False  # the text is what was heard (conversation.item.truncate)
    generated: str | None = None  # the text before it was truncated
    status: str = "in_progress"
    details: dict[str, Any] | None = None
    in_conversation: bool = True  # False: out-of-band (conversation "none")
    aside: bool = False  # out-of-band with its own input: runs beside the Session's replies
    marks: list[int] = field(default_factory=list)  # len(text) after each delta
    tokens: int = 0  # reply tokens (deltas) seen, after a truncate too
    cut: int | None = None  # the tokens the model's history was cut to


@dataclass(frozen=True)
class Options:
    """What a response is asked to be (the session's settings or response.create's)."""

    modalities: tuple[str, ...]
    audio: bool  # audio deltas will come (the server speaks and audio is asked)
    max_output_tokens: int | None
    metadata: dict[str, Any] | None
    output_format: str
    voice: str
    in_conversation: bool = True


def usage_of(native: dict[str, int]) -> dict[str, Any]:
    """Native usage {prompt_tokens, cached_tokens, completion_tokens} -> GA usage."""
    prompt = int(native.get("prompt_tokens", 0))
    out = int(native.get("completion_tokens", 0))
    return {
        "total_tokens": prompt + out,
        "input_tokens": prompt,
        "output_tokens": out,
        "input_token_details": {"cached_tokens": int(native.get("cached_tokens", 0))},
        "output_token_details": {"text_tokens": out, "audio_tokens": 0},
    }


class Responses:
    def __init__(
        self,
        ids: Ids,
        items: Items,
        conversation_id: str,
        token_limit: int,
        history: ModelHistory | None = None,
    ) -> None:
        self.ids = ids
        self.items = items
        self.history = history if history is not None else ModelHistory()
        self.conversation_id = conversation_id
        self.token_limit = token_limit
        self.open: dict[str, Response] = {}  # by native reply id
        self.finished: dict[str, Response] = {}  # by item id, the last FINISHED_KEPT
        self._formats: dict[str, Options] = {}

    @property
    def in_progress(self) -> Response | None:
        """The newest response of the Session not finished yet (not an aside)."""
        return next((r for r in reversed(self.open.values()) if not r.aside), None)

    @property
    def asides(self) -> int:
        return sum(1 for r in self.open.values() if r.aside)

    def by_id(self, response_id: str) -> Response | None:
        return next((r for r in self.open.values() if r.id == response_id), None)

    def _object(self, r: Response) -> dict[str, Any]:
        opts = self._formats[r.id]
        done = r.status != "in_progress"
        return {
            "object": "realtime.response",
            "id": r.id,
            "status": r.status,
            "status_details": r.details,
            "output": [self._item(r)] if done else [],
            "conversation_id": self.conversation_id if r.in_conversation else None,
            "output_modalities": list(r.modalities),
            "max_output_tokens": "inf" if r.max_output_tokens is None else r.max_output_tokens,
            "audio": {"output": {"format": format_object(opts.output_format), "voice": opts.voice}},
            "usage": r.usage if done else None,
            "metadata": r.metadata,
        }

    def _part(self, r: Response) -> dict[str, Any]:
        if r.audio or "audio" in r.modalities:
            return {"type": "audio", "transcript": r.text}
        return {"type": "text", "text": r.text}

    def _item(self, r: Response) -> dict[str, Any]:
        part = self._part(r)
        content = (
            [{"type": "output_audio", "transcript": r.text}]
            if part["type"] == "audio"
            else [{"type": "output_text", "text": r.text}]
        )
        status = r.status if r.status in ("in_progress", "completed") else "incomplete"
        return {
            "id": r.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content if r.text or r.status != "in_progress" else [],
        }

    def _where(self, r: Response) -> dict[str, Any]:
        return {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}

    def start(self, reply_id: str, opts: Options, *, aside: bool = False) -> list[dict[str, Any]]:
        """reply.started: finish what still waits for its audio (completed:
        its text was generated; the speaker stops its audio for the new
        reply), then open the new response. (An aside touches no other.)"""
        out: list[dict[str, Any]] = []
        for old in list(self.open.values()):  # its text is done: only its audio is cut
            if not aside and not old.aside:
                out += self._complete(old)
        r = Response(
            self.ids.next("resp"),
            reply_id,
            self.ids.next("item"),
            opts.audio,
            opts.modalities,
            opts.max_output_tokens,
            opts.metadata,
            in_conversation=opts.in_conversation,
            aside=aside,
        )
        self._formats[r.id] = opts
        self.open[reply_id] = r
        item = self._item(r)
        e = self.ids.event
        out += [
            e("response.created", response=self._object(r)),
            e("response.output_item.added", response_id=r.id, output_index=0, item=item),
        ]
        if r.in_conversation:
            previous = self.items.add(item)
            out.append(e("conversation.item.added", previous_item_id=previous, item=item))
        out.append(e("response.content_part.added", **self._where(r), part=self._part(r)))
        return out

    def delta(self, reply_id: str, text: str) -> list[dict[str, Any]]:
        r = self.open.get(reply_id)
        if r is None or r.text_done:
            return []
        r.tokens += 1
        if r.truncated:
            return []
        r.text += text
        r.marks.append(len(r.text))
        audio = r.audio or "audio" in r.modalities
        kind = "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
        return [self.ids.event(kind, **self._where(r), delta=text)]

    def by_reply(self, reply_id: str) -> Response | None:
        """The response of a native reply (open, or one of the finished kept)."""
        return self.open.get(reply_id) or next(
            (r for r in self.finished.values() if r.reply_id == reply_id), None
        )

    def by_item(self, item_id: str) -> Response | None:
        return self.finished.get(item_id) or next(
            (r for r in self.open.values() if r.item_id == item_id), None
        )

    def audio(self, reply_id: str | None, b64: str, ms: float) -> list[dict[str, Any]]:
        r = self.open.get(reply_id) if reply_id is not None else self.in_progress
        if r is None or not r.audio or r.audio_done:
            return []
        r.audio_ms += ms
        return [self.ids.event("response.output_audio.delta", **self._where(r), delta=b64)]

    def done(self, reply_id: str, text: str, usage: dict[str, int]) -> list[dict[str, Any]]:
        r = self.open.get(reply_id)
        if r is None:
            return []
        if not r.truncated:
            r.text = text
        r.text_done, r.usage = True, usage_of(usage)
        if r.audio and not r.audio_done:
            return []  # response.done once its audio has gone out
        return self._complete(r)

    def audio_done(self, reply_id: str, cancelled: bool) -> list[dict[str, Any]]:
        """The reply's audio has all gone out (or was stopped), or none will come."""
        r = self.open.get(reply_id)
        if r is None or r.audio_done:
            return []
        r.audio_done = True
        if cancelled:
            return self._finish(r, "cancelled", {"type": "cancelled", "reason": "turn_detected"})
        return self._complete(r) if r.text_done else []

    def _complete(self, r: Response) -> list[dict[str, Any]]:
        """Finished: `incomplete` when the reply stopped at its token limit."""
        if r.usage.get("output_tokens", 0) >= (r.max_output_tokens or self.token_limit):
            details = {"type": "incomplete", "reason": "max_output_tokens"}
            return self._finish(r, "incomplete", details)
        return self._finish(r, "completed", None)

    def cancelled(self, reply_id: str, reason: str, text: str) -> list[dict[str, Any]]:
        r = self.open.get(reply_id)
        if r is None:
            return []
        if not r.truncated:
            r.text = text
        details = {"type": "cancelled", "reason": _REASONS.get(reason, "client_cancelled")}
        return self._finish(r, "cancelled", details)

    def cancel_held(self) -> list[dict[str, Any]]:
        """response.cancel of a response whose text is done and whose audio
        still goes out: it ends now, cancelled."""
        out: list[dict[str, Any]] = []
        for r in list(self.open.values()):
            if r.text_done:
                details = {"type": "cancelled", "reason": "client_cancelled"}
                out += self._finish(r, "cancelled", details)
        return out

    def failed(self, reply_id: str, code: str, message: str) -> list[dict[str, Any]]:
        r = self.open.get(reply_id)
        if r is None:
            return []
        self.history.forget(r.item_id)  # (a failed turn leaves nothing the client can edit)
        kind = "invalid_request_error" if code == "bad_message" else "server_error"
        details = {"type": "failed", "error": {"type": kind, "code": code, "message": message}}
        return self._finish(r, "failed", details)

    def _finish(
        self, r: Response, status: str, details: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        del self.open[r.reply_id]
        r.status, r.details, r.audio_done, r.text_done = status, details, True, True
        where = self._where(r)
        e = self.ids.event
        out: list[dict[str, Any]] = []
        if r.audio or "audio" in r.modalities:
            if r.audio:
                out.append(e("response.output_audio.done", **where))
            out.append(e("response.output_audio_transcript.done", **where, transcript=r.text))
        else:
            out.append(e("response.output_text.done", **where, text=r.text))
        item = self._item(r)
        if r.item_id in self.items:  # (replaces the in-progress copy in place; not if deleted)
            self.items.add(item)
        out += [
            e("response.content_part.done", **where, part=self._part(r)),
            e("response.output_item.done", response_id=r.id, output_index=0, item=item),
        ]
        if r.in_conversation:
            previous = self._previous(r.item_id)
            out.append(e("conversation.item.done", previous_item_id=previous, item=item))
        out.append(e("response.done", response=self._object(r)))
        used = int(r.usage.get("output_tokens", 0))
        limit = r.max_output_tokens or self.token_limit
        out.append(
            e(
                "rate_limits.updated",
                rate_limits=[
                    {
                        "name": "tokens",
                        "limit": limit,
                        "remaining": max(0, limit - used),
                        "reset_seconds": 0.0,
                    }
                ],
            )
        )
        self._formats.pop(r.id, None)
        if r.in_conversation:
            self.finished[r.item_id] = r
        while len(self.finished) > FINISHED_KEPT:
            del self.finished[next(iter(self.finished))]
        return out

    def truncate_request(self, r: ItemTruncate) -> list[Out]:
        """The user heard the assistant item up to audio_end_ms: its audio
        stops, a reply still generating is cancelled, the item's transcript
        is cut, and so is the model's history when the reply is its last
        message (TruncateReply: the reply tokens heard; otherwise the
        history keeps the reply: see docs/openai-realtime.md)."""
        item = self.items.get(r.item_id)
        if item is None:
            raise self.items.missing(r.item_id)
        response = self.by_item(r.item_id)
        if item.get("role") != "assistant" or response is None:
            raise InvalidField("only a recent assistant item can be truncated", "item_id")
        if r.content_index != 0:
            raise InvalidField("the item has one content part (index 0)", "content_index")
        if r.audio_end_ms > math.ceil(response.audio_ms):
            raise InvalidField(
                f"audio_end_ms is past the item's audio ({math.ceil(response.audio_ms)} ms)",
                "audio_end_ms",
            )
        last = self.history.last_reply(r.item_id)
        out: list[Out] = []
        if response.status == "in_progress":
            out.append(StopAudio())
            if response.text_done:
                out += self.cancel_held()
            else:
                out.append(Cancel())
        self.truncate(response, r.audio_end_ms)
        if last:
            keep = heard_tokens(response.marks, len(response.text))
            response.marks = response.marks[:keep]
            out += self.cut(response, keep)
        out.append(
            self.ids.event(
                "conversation.item.truncated",
                item_id=r.item_id,
                content_index=0,
                audio_end_ms=r.audio_end_ms,
            )
        )
        return out

    def interrupt(self) -> list[Out]:
        """Speech started: cancel the response in flight (interrupt_response)."""
        current = self.in_progress
        if current is None:
            return []
        if current.text_done:
            return [StopAudio(), *self.cancel_held()]
        return [StopAudio(), Cancel()]

    def cancel_request(self, response_id: str | None) -> list[Out]:
        """response.cancel: the response generating, or the audio still going out."""
        current = self.in_progress
        asked = self.by_id(response_id) if response_id is not None else None
        if response_id is not None and asked is None:
            raise NoActiveResponse("no such response in progress", "response_id")
        if asked is not None and asked.aside:
            return [CancelAside(asked.reply_id)]
        if current is None:
            raise NoActiveResponse("no response is in progress", "response_id")
        if current.text_done:
            return [StopAudio(), *self.cancel_held()]
        return [StopAudio(), Cancel()]

    def cut(self, r: Response, keep: int) -> list[Out]:
        """Cut the model's history of `r` (its last reply) to `keep` reply
        tokens, if that removes anything. Queued now: the engine applies it
        after the reply's turn settles (a generating reply was just
        cancelled, and keeps at least the deltas seen). A reply with no delta
        seen is empty in the history or not in it at all (a turn cancelled
        before its first token: a cut would land on an older reply): left
        alone."""
        if r.tokens == 0 or (r.cut is not None and keep >= r.cut):
            return []
        if r.text_done and keep >= r.tokens:
            return []
        r.cut = keep
        return [Edit(TruncateReply(keep))]

    def truncate(self, r: Response, audio_end_ms: int) -> dict[str, Any]:
        """Cut the item's transcript to what was heard by `audio_end_ms` (the
        share of its audio, back to a word boundary); the truncated item."""
        heard = min(1.0, audio_end_ms / r.audio_ms) if r.audio_ms > 0 else 0.0
        full = r.generated = r.text if r.generated is None else r.generated
        cut = full[: round(len(full) * heard)]
        if len(cut) < len(full) and " " in cut:
            cut = cut[: cut.rindex(" ")]
        cut = cut.rstrip() if heard < 1.0 else full
        if not r.truncated or len(cut) < len(r.text):  # (a cut is never undone)
            r.text = cut
        r.truncated = True
        item = self._item(r)
        self.items.add(item)
        return item

    def _previous(self, item_id: str) -> str | None:
        previous = None
        for key in self.items.ids():
            if key == item_id:
                return previous
            previous = key
        return previous
