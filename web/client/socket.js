// The WebSocket session (PROTOCOL.md, "WebSocket"): requests with ids and
// their acks or errors, pushes by event name, reconnection with backoff,
// and the connection's state for the page.

import { ApiError } from "./api.js";

const MIN_WAIT = 500;
const MAX_WAIT = 10000;

export class Session {
  // onState(state): "connecting" | "catching-up" | "live" | "offline"
  // onOpen(): after each `a_session`; the state is "live" once it resolves
  // onPush(event, data); onFatal(code, message): stopped for good
  constructor({ token, device, expiresAt, onState, onOpen, onPush, onFatal }) {
    Object.assign(this, { token, device, expiresAt, onState, onOpen, onPush, onFatal });
    this.nextId = 1;
    this.waiting = new Map();
    this.stopped = false;
    this.attempt = 0;
    this.ws = null;
    this.state = "offline";
  }

  setState(s) {
    this.state = s;
    this.onState(s);
  }

  start() {
    if (this.stopped) return;
    if (this.expiresAt && Date.now() >= this.expiresAt) {
      this.stopped = true;
      this.setState("offline");
      this.onFatal("unauthorized", "your token has expired: sign in again");
      return;
    }
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${proto}//${location.host}/ws?device=${encodeURIComponent(this.device)}`;
    this.setState("connecting");
    let ws;
    try {
      ws = new WebSocket(url, ["chat.v1", "bearer." + this.token]);
    } catch {
      this.retry();
      return;
    }
    this.ws = ws;
    ws.onmessage = (e) => this.frame(ws, e.data);
    ws.onclose = (e) => this.closed(ws, e.code, e.reason);
  }

  frame(ws, text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    if (f.event === "ack" || (f.event === "error" && f.id !== undefined)) {
      const w = this.waiting.get(f.id);
      if (!w) return;
      this.waiting.delete(f.id);
      if (f.event === "ack") w.resolve(f.data || {});
      else w.reject(new ApiError(f.data?.code || "internal", f.data?.message || "error"));
      return;
    }
    if (f.event === "a_session") {
      this.attempt = 0;
      this.setState("catching-up");
      Promise.resolve(this.onOpen())
        .catch(() => {})
        .then(() => {
          if (this.ws === ws && ws.readyState === WebSocket.OPEN) this.setState("live");
        });
      return;
    }
    if (f.event === "error") {
      this.onPush("error", f.data || {});
      return;
    }
    this.onPush(f.event, f.data || {});
  }

  closed(ws, code, reason) {
    if (this.ws !== ws) return;
    this.ws = null;
    for (const w of this.waiting.values()) w.reject(new ApiError("unavailable", "connection lost"));
    this.waiting.clear();
    if (this.stopped) return;
    if (code === 1008) {
      this.stopped = true;
      this.setState("offline");
      this.onFatal("forbidden", reason || "closed by the server after repeated errors");
      return;
    }
    if (code === 4401) {
      // the token expired: the same one would be refused
      this.stopped = true;
      this.setState("offline");
      this.onFatal("unauthorized", "your token has expired: sign in again");
      return;
    }
    this.retry();
  }

  retry() {
    this.setState("offline");
    const wait = Math.min(MAX_WAIT, MIN_WAIT * 2 ** this.attempt) * (0.75 + Math.random() / 2);
    this.attempt += 1;
    this.timer = setTimeout(() => this.start(), wait);
  }

  request(event, data) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ApiError("unavailable", "not connected"));
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      ws.send(JSON.stringify({ event, id, data }));
    });
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, "signed out");
    this.ws = null;
    this.setState("offline");
  }
}
