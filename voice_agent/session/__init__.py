"""Session: one conversation's turn state machine (sans-I/O, no clocks).

The async driver feeds it microphone PCM, typed text, client commands and what
the engine reports for each reply; it returns the actions to execute, in order:

    Send(event)                              send a server event to the client
    SubmitTurn(reply_id, utterance_id, turn) submit `turn` to the engine; report
                                             its deltas/result/failure back with
                                             on_delta / on_done / on_failed
    CancelTurn(reply_id, keep_tokens, reason) cancel that engine turn, keeping
                                             `keep_tokens` reply tokens
    EditHistory(edit)                        engine.edit_history(conversation,
                                             edit), in order with the turns
    DetectTurn(utterance_id, check, audio)   ask the end-of-turn detector about
                                             `audio` (off the event loop) and
                                             report with on_turn_decision
    StopAudio(reply_id, reason)              stop that reply's spoken audio (its
                                             text is done; see Barge-in)

End of turn: with `vad.turn_check` (the driver has a detector, see turn.py)
the segmenter asks after `vad.min_silence_ms` of silence, and again at each
`vad.recheck_ms` point while the silence lasts; a probability at or above the
threshold of that check (`turn_threshold` at the first, then the
`turn_rechecks` schedule, see turn.threshold_at) closes the utterance at once
(speech.stopped reason "end_of_turn"), a lower one keeps it open until
`vad.max_silence_ms` of silence (reason "silence") or more speech.
speech.stopped carries the probability of the pause it closed on as
`eot_probability` (the latest check's).

A Send(ReplyStarted) always comes right before its SubmitTurn. If submitting
fails at once (errors.Busy), the driver calls on_failed for that reply id.

At most one reply runs at a time. Turns (closed utterances and typed text)
that arrive while a reply runs wait in a queue and are answered in order. The
queue holds at most `max_queued_utterances` waiting turns; when a new one
would exceed it, the OLDEST waiting turn is dropped, counted in
`dropped_utterances` and reported with an `error` event (code `busy`).

State (`state`): "thinking" while a reply runs and no delta was sent yet,
"replying" once one was; otherwise "listening" while an utterance is open
(speech.started sent, speech.stopped not yet), else "idle". The reply wins
over speech: while the user talks over a reply the state stays the reply's.

Barge-in: speech that started after the running reply was submitted and
that the VAD scored as speech for `barge_in_ms` (voiced frames only, so the
gaps of a door slam or a clatter do not add up; with vad="silero" music and
noise score no speech at all) cancels the reply: CancelTurn(keep_tokens =
tokens of the last sent delta, "barge_in") and
reply.cancelled with the text sent so far. `barge_in_ms <= 0` turns barge-in
off. Speech that was already going on when a reply was submitted never
cancels it, nor does the continuation of an utterance split at max length.

Barge-in while the assistant is heard: the driver reports the reply's audio
with playback(reply_id, True) when reply.audio.started goes out and
playback(reply_id, False) when the audio has finished playing (or stopped).
In between, speech must last `barge_in_speaking_ms` (default 500, never less
than barge_in_ms) to barge in, so echo of the assistant's own voice that the
client's echo cancellation missed does not cut it off. Playback may outlast
the reply's text: speech that long after reply.done, while the audio still
plays, returns StopAudio(reply_id, "barge_in") (no reply.cancelled: the
text reply has finished and stays whole in the history); it counts in
`barge_ins`, and the interrupting utterance is answered when it closes.
Playback reports for a reply that is no longer the newest, or that was
cancelled or stopped, are ignored; a new reply, a cancel or StopAudio end
playback for the Session at once.
Turns that were waiting behind the barged-in reply stay queued in order, and
nothing new is submitted until the interrupting utterance has closed; it then
joins the queue behind them. A client `cancel` works the same way (reason
"client") but submits the next waiting turn at once.

Continuation (continuation.py): an utterance that closed on a pause
("silence" or "end_of_turn") stays the candidate while no other turn comes
after it. Speech that starts within `continue_window_ms` of its close, while
its reply had been heard (playback reports; mic audio counted from the
report of its start) for at most `continue_heard_ms`, resumes it; once that
speech has been scored as speech for barge_in_ms (barge_in_speaking_ms while
that reply's audio plays; with `speech_check`, only frames Silero is sure of
count), or, when it closes sooner (a short last word), Silero was sure of
100 ms of it (speech_check or vad="silero"), the reply is taken back:
StopAudio(reply_id, "continued"),
CancelTurn(keep_tokens=0, "continued") if it still runs, reply.cancelled
(reason "continued", which may follow its reply.done), EditHistory(
DropTurns(1, submitted=True)) (that turn, whether or not it had started in
the engine) and its entries leave `history`; a turn still waiting is just
taken out of the queue. When the new utterance closes, it is answered as one
turn whose audio runs from the first one's audio start to its own end, the
pause included (the Segmenter keeps the recent audio for that); its
speech.stopped says `continues: <first utterance id>`; Speculate and
DetectTurn carry the joined audio too. While the resuming speech has not
decided, it does not barge in (noise that Silero rejects cuts nothing). A
typed turn is never joined and ends the candidate; so do a client cancel of
its reply, its failure, and command events of its reply (it acted: it
stays). Joined audio longer than max_utterance_ms is answered as the two
turns again. `continue_window_ms <= 0` or
`barge_in_ms <= 0` turns continuation off.

Commands: with a `devices` allowlist in the config, on_done follows the
reply.done of a finished (not cancelled) reply with one `command` event per
valid command in its text (commands.parse_commands); invalid ones are only
counted in `rejected_commands`, by reason.

History: a turn enters `history` when it ends (done or cancelled), as a user
entry followed by an assistant entry; a cancelled reply keeps only the text
that was sent. Failed and dropped turns never enter it (the engine drops a
failed turn from its history as well).
"""

from voice_agent.session.actions import (
    Action,
    CancelTurn,
    DetectTurn,
    EditHistory,
    HistoryEntry,
    Send,
    Speculate,
    StopAudio,
    SubmitTurn,
)
from voice_agent.session.config import SessionConfig
from voice_agent.session.machine import Session, State

__all__ = [
    "Action",
    "CancelTurn",
    "DetectTurn",
    "EditHistory",
    "HistoryEntry",
    "Send",
    "Session",
    "SessionConfig",
    "Speculate",
    "State",
    "StopAudio",
    "SubmitTurn",
]
