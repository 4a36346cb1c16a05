#!/usr/bin/env node
// Load driver for Jano's benchmarks (Node, no npm packages): chat completions over
// raw keep-alive sockets, every response verified, one JSON line of results.
//
//   node load_driver.js '<json options>'
//
// Options (JSON object):
//   port          target port on 127.0.0.1 (required)
//   stream        true: streamed requests (SSE), false: non-streamed
//   n             requests in total (default 100)
//   c             concurrency: connections, each running one request at a time (default 1)
//   tokens        max_tokens, i.e. content chunks per response (default 16)
//   delayMs       X-Fake-Delay-Ms, gap between chunks (default 0)
//   chunkBytes    X-Fake-Chunk-Bytes, padding per chunk (default 0)
//   stamp         X-Fake-Stamp: measure each chunk's transit time (default false)
//   rampMs        connection k starts its first request at k * rampMs / c (default 0)
//   maxSeconds    hard cap on the whole run; unfinished requests then count as
//                 "time_capped" errors (default 30)
//   timeoutMs     per-request timeout (default 60000)
//   model         "model" of the request body (default "fake-model")
//
// Checks on every response: status 200; well-formed HTTP/1.1 framing (chunked or
// Content-Length); content chunks "Tok<i mod 10>" exactly `tokens` of them and in
// order; for streams, a usage chunk whose completion_tokens equals `tokens` and a
// final "data: [DONE]"; for non-streamed answers, "completion_tokens":<tokens>.
//
// Time stamps come from process.hrtime (CLOCK_MONOTONIC), the clock the fake
// backend stamps chunks with, so transit = arrival (read event) - backend write.
"use strict";

const net = require("net");

const o = Object.assign(
  { stream: false, n: 100, c: 1, tokens: 16, delayMs: 0, chunkBytes: 0, stamp: false,
    rampMs: 0, maxSeconds: 30, timeoutMs: 60000, model: "fake-model" },
  JSON.parse(process.argv[2] || "{}"));
if (!o.port) { process.stderr.write("load_driver: port is required\n"); process.exit(2); }

const nowNs = () => Number(process.hrtime.bigint());
const TOK = Buffer.from("Tok", "latin1");
const DONE = "data: [DONE]\n\n";
const TAIL_KEEP = 2048;

// --- the request ---------------------------------------------------------------

const bodyObj = { model: o.model, messages: [{ role: "user", content: "Say hi" }], max_tokens: o.tokens };
if (o.stream) { bodyObj.stream = true; bodyObj.stream_options = { include_usage: true }; }
const body = Buffer.from(JSON.stringify(bodyObj));
let extra = "";
if (o.delayMs) extra += `X-Fake-Delay-Ms: ${o.delayMs}\r\n`;
if (o.chunkBytes) extra += `X-Fake-Chunk-Bytes: ${o.chunkBytes}\r\n`;
if (o.stamp) extra += "X-Fake-Stamp: 1\r\n";
const requestBytes = Buffer.concat([
  Buffer.from(
    "POST /v1/chat/completions HTTP/1.1\r\n" +
    `Host: 127.0.0.1:${o.port}\r\n` +
    "Content-Type: application/json\r\n" +
    (o.stream ? "Accept: text/event-stream\r\n" : "") +
    extra +
    `Content-Length: ${body.length}\r\n\r\n`, "latin1"),
  body]);

// --- results -------------------------------------------------------------------

const R = {
  ok: 0, errors: 0, error_kinds: {}, time_capped: false,
  bytes: 0, chunks: 0, latency: [], ttfb: [], transit: [],
};
function fail(kind) {
  R.errors++;
  R.error_kinds[kind] = (R.error_kinds[kind] || 0) + 1;
}

// --- one response's body checks ---------------------------------------------------

class BodyCheck {
  constructor() {
    this.count = 0;
    this.carry = null;
    this.tail = null;
    this.bad = null;
  }

  feed(piece, t) {
    R.bytes += piece.length;
    this.keepTail(piece);
    let data = piece;
    if (this.carry) { data = Buffer.concat([this.carry, piece]); this.carry = null; }
    const len = data.length;
    let pos = 0;
    for (;;) {
      const i = data.indexOf(TOK, pos);
      if (i < 0) break;
      if (i + 3 >= len) { this.carry = Buffer.from(data.subarray(i)); return; }
      const d = data[i + 3] - 48;
      let j = i + 4;
      if (o.stamp && o.stream) {
        if (j >= len) { this.carry = Buffer.from(data.subarray(i)); return; }
        if (data[j] !== 64) { this.bad = this.bad || "stamp_missing"; pos = j; continue; }
        let k = j + 1;
        while (k < len && data[k] >= 48 && data[k] <= 57) k++;
        if (k >= len) { this.carry = Buffer.from(data.subarray(i)); return; }
        const stamp = Number(data.toString("latin1", j + 1, k));
        R.transit.push((t - stamp) / 1e6);
        j = k;
      }
      if (d !== this.count % 10) this.bad = this.bad || "out_of_order";
      this.count++;
      pos = j;
    }
    // A "T" or "To" at the very end may start the next "Tok".
    if (len >= 1 && pos < len) {
      if (len - pos >= 2 && data[len - 2] === 84 && data[len - 1] === 111) this.carry = Buffer.from("To", "latin1");
      else if (data[len - 1] === 84) this.carry = Buffer.from("T", "latin1");
    }
  }

  keepTail(piece) {
    if (piece.length >= TAIL_KEEP) this.tail = Buffer.from(piece.subarray(piece.length - TAIL_KEEP));
    else if (!this.tail) this.tail = Buffer.from(piece);
    else {
      const t = Buffer.concat([this.tail, piece]);
      this.tail = t.length > TAIL_KEEP ? t.subarray(t.length - TAIL_KEEP) : t;
    }
  }

  verdict() {
    if (this.bad) return this.bad;
    if (this.count !== o.tokens) return "incomplete_content";
    const tail = this.tail ? this.tail.toString("latin1") : "";
    if (o.stream) {
      if (!tail.endsWith(DONE)) return "no_done";
      const u = tail.lastIndexOf('"usage":');
      if (u < 0) return "no_usage";
      const m = /"completion_tokens":(\d+)/.exec(tail.slice(u));
      if (!m || Number(m[1]) !== o.tokens) return "usage_wrong";
    } else if (tail.indexOf(`"completion_tokens":${o.tokens}`) < 0) {
      return "usage_wrong";
    }
    return null;
  }
}

// --- one keep-alive connection --------------------------------------------------

const HEAD = 0, CHUNK_SIZE = 1, CHUNK_DATA = 2, CHUNK_CRLF = 3, TRAILER = 4, LENGTH = 5, CLOSE = 6, IDLE = 7;

class Client {
  constructor() {
    this.sock = null;
    this.state = IDLE;
    this.onDone = null;
  }

  connect() {
    const sock = net.createConnection({ host: "127.0.0.1", port: o.port });
    sock.setNoDelay(true);
    sock.on("data", (d) => this.onData(d));
    sock.on("error", () => {});
    sock.on("close", () => {
      if (this.sock !== sock) return; // an earlier connection of this client
      this.sock = null;
      if (this.state === CLOSE) return this.end(null);
      if (this.state !== IDLE) this.end("closed_early");
    });
    this.sock = sock;
  }

  request(onDone) {
    if (!this.sock || this.sock.destroyed) this.connect();
    this.onDone = onDone;
    this.state = HEAD;
    this.head = null;
    this.check = new BodyCheck();
    this.status = 0;
    this.started = nowNs();
    this.firstByte = 0;
    this.timer = setTimeout(() => { this.end("timeout"); }, o.timeoutMs);
    this.sock.write(requestBytes);
  }

  abort(kind) {
    if (this.state !== IDLE) this.end(kind);
  }

  end(error) {
    if (this.state === IDLE) return;
    const keep = error === null && this.state !== CLOSE && this.keepAlive;
    this.state = IDLE;
    clearTimeout(this.timer);
    if (!keep && this.sock) { this.sock.destroy(); this.sock = null; }
    const t = nowNs();
    if (error === null && this.status !== 200) error = `status_${this.status}`;
    if (error === null) error = this.check.verdict();
    if (error === null) {
      R.ok++;
      R.chunks += this.check.count;
      R.latency.push((t - this.started) / 1e6);
      R.ttfb.push((this.firstByte - this.started) / 1e6);
    } else {
      R.chunks += this.check.count;
      fail(error);
    }
    const cb = this.onDone;
    this.onDone = null;
    cb();
  }

  onData(buf) {
    const t = nowNs();
    if (this.state === IDLE) { fail("unexpected_bytes"); if (this.sock) this.sock.destroy(); this.sock = null; return; }
    if (this.state === HEAD) {
      if (!this.firstByte) this.firstByte = t;
      this.head = this.head ? Buffer.concat([this.head, buf]) : buf;
      const e = this.head.indexOf("\r\n\r\n");
      if (e < 0) { if (this.head.length > 65536) this.end("bad_head"); return; }
      const lines = this.head.toString("latin1", 0, e).split("\r\n");
      const m = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0]);
      if (!m) return this.end("bad_head");
      this.status = Number(m[2]);
      let chunked = false, length = -1, close = m[1] === "0";
      for (let k = 1; k < lines.length; k++) {
        const c = lines[k].indexOf(":");
        const name = lines[k].slice(0, c).trim().toLowerCase();
        const value = lines[k].slice(c + 1).trim().toLowerCase();
        if (name === "transfer-encoding") chunked = value.includes("chunked");
        else if (name === "content-length") length = Number(value);
        else if (name === "connection") close = value.includes("close");
      }
      this.keepAlive = !close;
      buf = this.head.subarray(e + 4);
      this.head = null;
      if (chunked) { this.state = CHUNK_SIZE; this.line = ""; }
      else if (length >= 0) { this.state = LENGTH; this.left = length; if (length === 0) return this.end(null); }
      else { this.state = CLOSE; this.keepAlive = false; }
    }
    this.body(buf, t);
  }

  body(buf, t) {
    let p = 0;
    const n = buf.length;
    while (p < n && this.state !== IDLE) {
      switch (this.state) {
        case LENGTH: {
          const take = Math.min(this.left, n - p);
          this.check.feed(buf.subarray(p, p + take), t);
          p += take;
          this.left -= take;
          if (this.left === 0) { if (p < n) fail("extra_bytes"); return this.end(null); }
          break;
        }
        case CLOSE:
          this.check.feed(buf.subarray(p), t);
          return;
        case CHUNK_SIZE: {
          const lf = buf.indexOf(10, p);
          if (lf < 0) { this.line += buf.toString("latin1", p); p = n; if (this.line.length > 64) return this.end("bad_framing"); break; }
          this.line += buf.toString("latin1", p, lf + 1);
          p = lf + 1;
          const size = parseInt(this.line, 16);
          if (!/^[0-9a-fA-F]+(;[^\r]*)?\r\n$/.test(this.line) || !(size >= 0)) return this.end("bad_framing");
          this.line = "";
          if (size === 0) { this.state = TRAILER; this.trailer = ""; }
          else { this.state = CHUNK_DATA; this.left = size; }
          break;
        }
        case CHUNK_DATA: {
          const take = Math.min(this.left, n - p);
          this.check.feed(buf.subarray(p, p + take), t);
          p += take;
          this.left -= take;
          if (this.left === 0) { this.state = CHUNK_CRLF; this.crlf = 0; }
          break;
        }
        case CHUNK_CRLF: {
          const want = this.crlf === 0 ? 13 : 10;
          if (buf[p] !== want) return this.end("bad_framing");
          p++;
          if (++this.crlf === 2) this.state = CHUNK_SIZE;
          break;
        }
        case TRAILER: {
          this.trailer += buf.toString("latin1", p);
          p = n;
          if (this.trailer === "\r\n" || this.trailer.endsWith("\r\n\r\n")) return this.end(null);
          if (this.trailer.length > 8192) return this.end("bad_framing");
          break;
        }
      }
    }
  }
}

// --- the run ---------------------------------------------------------------------

function pct(arr, q) {
  if (!arr.length) return null;
  const s = Float64Array.from(arr).sort();
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}
function summary(arr) {
  if (!arr.length) return null;
  const s = Float64Array.from(arr).sort();
  const at = (q) => s[Math.min(s.length - 1, Math.floor(q * s.length))];
  let sum = 0;
  for (const v of s) sum += v;
  return { n: s.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: s[s.length - 1], mean: sum / s.length };
}

const clients = [];
let issued = 0;
let active = 0;
let finished = false;
const cpu0 = process.cpuUsage();
const t0 = nowNs();

function next(client) {
  if (finished) return;
  if (R.time_capped || issued >= o.n) {
    if (active === 0) finish();
    return;
  }
  issued++;
  active++;
  client.request(() => { active--; next(client); });
}

function finish() {
  if (finished) return;
  finished = true;
  clearTimeout(capTimer);
  const t1 = nowNs();
  const cpu = process.cpuUsage(cpu0);
  const dur = (t1 - t0) / 1e9;
  const out = {
    ok: R.ok, errors: R.errors, error_kinds: R.error_kinds, time_capped: R.time_capped,
    n: o.n, c: o.c, tokens: o.tokens, stream: o.stream,
    duration_s: dur,
    rps: R.ok / dur,
    chunks: R.chunks,
    chunks_per_s: R.chunks / dur,
    bytes: R.bytes,
    mb_per_s: R.bytes / 1e6 / dur,
    latency_ms: summary(R.latency),
    ttfb_ms: summary(R.ttfb),
    transit_ms: summary(R.transit),
    driver_cpu_ms: (cpu.user + cpu.system) / 1000,
  };
  for (const c of clients) if (c.sock) c.sock.destroy();
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(0));
}

const capTimer = setTimeout(() => {
  R.time_capped = true;
  for (const c of clients) c.abort("time_capped");
  if (active === 0) finish();
}, o.maxSeconds * 1000);

const conns = Math.max(1, Math.min(o.c, o.n));
for (let k = 0; k < conns; k++) {
  const c = new Client();
  clients.push(c);
  const delay = o.rampMs ? (k * o.rampMs) / conns : 0;
  if (delay) setTimeout(() => next(c), delay);
  else next(c);
}
if (o.n === 0) finish();
