// Continuation (docs/protocol.md, "Continuation"): the user went on speaking
// soon after a pause, so the server took back the reply to the first part
// (reply.cancelled with reason "continued", possibly after its reply.done) and
// answers both utterances as one turn (speech.stopped with `continues`). The
// page then shows one user turn, from the first utterance's start, and no
// trace of the reply taken back.

export class Continuation {
  /** `conv`: the conversation list; `transcript`: the saved { turns } (same object for life). */
  constructor(conv, transcript) {
    this.conv = conv;
    this.transcript = transcript;
    this.last = null; // { id, t, start } of the last closed utterance
  }

  /** speech.stopped shown as turn `t` ({ li, entry }): where its audio starts (ms). */
  stopped(msg, t) {
    const prev = this.last;
    let start = msg.start_ms;
    if (msg.continues && prev && prev.id === msg.continues) {
      this.drop(prev.t.li, prev.t.entry);
      start = prev.start;
      t.li.dataset.continues = msg.continues;
    }
    this.last = { id: msg.utterance_id, t, start };
    return start;
  }

  /** reply.cancelled with reason "continued": the reply leaves the page and the transcript. */
  takeBack(replyId) {
    const li = [...this.conv.querySelectorAll("li.assistant")].find((el) => el.dataset.replyId === replyId);
    const entry = this.transcript.turns.find((e) => e.kind === "assistant" && e.replyId === replyId);
    this.drop(li, entry);
  }

  drop(li, entry) {
    if (li) li.remove();
    const i = this.transcript.turns.indexOf(entry);
    if (i >= 0) this.transcript.turns.splice(i, 1);
  }
}
