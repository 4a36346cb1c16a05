#!/usr/bin/env node
// A fast fake OpenAI-style chat server for Jano's benchmarks (Node, no npm packages).
//
// It speaks HTTP/1.1 over raw sockets (no `http` module), so that it costs
// little CPU per request and per chunk and is not what limits a benchmark.
//
//   node fake_backend.js [--port N] [--port-file FILE] [--host 127.0.0.1] [--quiet]
//
// Routes:
//   GET  /health                  {"status":"ok"}             (llama-server's health route)
//   GET  /v1/models               one model, "fake-model"
//   POST /v1/chat/completions     (also /chat/completions)
//
// A chat completion produces `max_tokens` (or `max_completion_tokens`, default 16)
// content chunks.  Chunk i's text is "Tok<i mod 10>", followed by the padding, so a
// client can count chunks and check their order.  Non-streamed: one
// `chat.completion` JSON object with the concatenated text and `usage`.
// Streamed (`"stream": true`): text/event-stream, one SSE event per HTTP chunk and
// per write: a role chunk, the content chunks, a finish_reason chunk, with
// `stream_options.include_usage` a `choices: []` chunk with `usage`, then
// `data: [DONE]`.
//
// Request headers:
//   X-Fake-Delay-Ms     gap between content chunks (the first goes at once); 0 = as
//                       fast as the socket takes them
//   X-Fake-Chunk-Bytes  padding bytes ("x") appended to every chunk's text
//   X-Fake-Stamp        (any value) each content chunk's text becomes
//                       "Tok<k>@<ns>", ns = CLOCK_MONOTONIC (process.hrtime) at write
//
// Bounds: <= 10,000,000 chunks, <= 1 MiB padding, <= 60 s delay, <= 1 MiB body.
"use strict";

const net = require("net");
const fs = require("fs");

const MAX_TOKENS = 10_000_000;
const MAX_PAD = 1 << 20;
const MAX_DELAY_MS = 60_000;
const MAX_BODY = 1 << 20;
const MAX_HEAD = 64 * 1024;

function parseArgs(argv) {
  const opts = { port: 0, host: "127.0.0.1", portFile: null, quiet: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--port") opts.port = Number(argv[++i]);
    else if (a === "--host") opts.host = argv[++i];
    else if (a === "--port-file") opts.portFile = argv[++i];
    else if (a === "--quiet") opts.quiet = true;
    else {
      process.stderr.write(`fake_backend: unknown argument ${a}\n`);
      process.exit(2);
    }
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
let serial = 0;
const plainCache = new Map();
const counters = { requests: 0, streams: 0, chunks: 0 };

// --- responses -------------------------------------------------------------------

function plainResponse(status, reason, ctype, body, keepAlive) {
  const buf = Buffer.isBuffer(body) ? body : Buffer.from(body);
  const head =
    `HTTP/1.1 ${status} ${reason}\r\n` +
    `Content-Type: ${ctype}\r\n` +
    `Content-Length: ${buf.length}\r\n` +
    (keepAlive ? "" : "Connection: close\r\n") +
    "\r\n";
  return Buffer.concat([Buffer.from(head, "latin1"), buf]);
}

function errorResponse(status, reason, message, keepAlive) {
  const body = JSON.stringify({ error: { message, type: "invalid_request_error", code: status } });
  return plainResponse(status, reason, "application/json", body, keepAlive);
}

// One SSE event framed as one HTTP/1.1 chunk.
function frame(event) {
  const payload = Buffer.isBuffer(event) ? event : Buffer.from(event, "latin1");
  return Buffer.concat([
    Buffer.from(payload.length.toString(16) + "\r\n", "latin1"),
    payload,
    Buffer.from("\r\n", "latin1"),
  ]);
}

function sse(obj) {
  return "data: " + JSON.stringify(obj) + "\n\n";
}

function usageOf(n) {
  return { prompt_tokens: 4, completion_tokens: n, total_tokens: n + 4 };
}

function chatCompletion(model, n, pad) {
  const padding = "x".repeat(pad);
  const parts = new Array(n);
  for (let i = 0; i < n; i++) parts[i] = "Tok" + (i % 10) + padding;
  return JSON.stringify({
    id: "chatcmpl-fake" + serial,
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [
      { index: 0, message: { role: "assistant", content: parts.join("") }, finish_reason: "length" },
    ],
    usage: usageOf(n),
  });
}

// A streamed answer: writes one framed event per chunk, paced by `delayMs`,
// pausing while the socket's buffer is full.
class Stream {
  constructor(conn, job) {
    this.conn = conn;
    this.sock = conn.sock;
    this.job = job;
    this.i = 0;
    this.timer = null;
    this.done = false;
    const id = "chatcmpl-fake" + serial;
    const created = Math.floor(Date.now() / 1000);
    // Text before and after the chunk text, so a content event is pre + text + post.
    const pre = `data: {"id":"${id}","object":"chat.completion.chunk","created":${created},"model":${JSON.stringify(job.model)},"choices":[{"index":0,"delta":{"content":"`;
    const post = `"},"finish_reason":null}]}\n\n`;
    this.pre = pre;
    this.post = post;
    this.padding = "x".repeat(job.pad);
    this.base = { id, object: "chat.completion.chunk", created, model: job.model };
    if (!job.stamp) {
      // Ten pre-framed variants: the hot loop only writes buffers.
      this.variants = [];
      for (let k = 0; k < 10; k++) this.variants.push(frame(pre + "Tok" + k + this.padding + post));
    }
  }

  start() {
    const head =
      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n" +
      "Transfer-Encoding: chunked\r\n" +
      (this.conn.keepAlive ? "" : "Connection: close\r\n") +
      "\r\n";
    const first = sse({ ...this.base, choices: [{ index: 0, delta: { role: "assistant", content: null }, finish_reason: null }] });
    this.sock.write(Buffer.concat([Buffer.from(head, "latin1"), frame(first)]));
    this.t0 = performance.now();
    this.pump();
  }

  chunk(i) {
    if (this.variants) return this.variants[i % 10];
    const text = "Tok" + (i % 10) + "@" + process.hrtime.bigint().toString() + this.padding;
    return frame(this.pre + text + this.post);
  }

  pump() {
    this.timer = null;
    if (this.done) return;
    const job = this.job;
    const sock = this.sock;
    if (job.delayMs > 0) {
      // Paced: one chunk now, the next at t0 + i * delay (no drift).
      if (this.i < job.n) {
        const ok = sock.write(this.chunk(this.i));
        this.i++;
        counters.chunks++;
        if (this.i < job.n) {
          const wait = Math.max(0, this.t0 + this.i * job.delayMs - performance.now());
          if (ok) this.timer = setTimeout(() => this.pump(), wait);
          else sock.once("drain", () => { if (!this.done) this.timer = setTimeout(() => this.pump(), wait); });
          return;
        }
      }
      this.finish();
      return;
    }
    // Back to back: one write per chunk while the socket takes them.
    while (this.i < job.n) {
      const ok = sock.write(this.chunk(this.i));
      this.i++;
      counters.chunks++;
      if (!ok) {
        sock.once("drain", () => this.pump());
        return;
      }
    }
    this.finish();
  }

  finish() {
    if (this.done) return;
    this.done = true;
    const job = this.job;
    let tail = sse({ ...this.base, choices: [{ index: 0, delta: {}, finish_reason: "length" }] });
    let out = frame(tail);
    if (job.includeUsage) out = Buffer.concat([out, frame(sse({ ...this.base, choices: [], usage: usageOf(job.n) }))]);
    out = Buffer.concat([out, frame("data: [DONE]\n\n"), Buffer.from("0\r\n\r\n", "latin1")]);
    this.sock.write(out);
    this.conn.responseDone();
  }

  abort() {
    this.done = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }
}

// --- connections ---------------------------------------------------------------------

class Conn {
  constructor(sock) {
    this.sock = sock;
    this.buf = null;
    this.busy = false; // a response is being produced
    this.stream = null;
    this.keepAlive = true;
    this.closed = false;
    sock.setNoDelay(true);
    sock.on("data", (d) => this.onData(d));
    sock.on("error", () => {});
    sock.on("close", () => {
      this.closed = true;
      if (this.stream) this.stream.abort();
    });
  }

  onData(d) {
    this.buf = this.buf ? Buffer.concat([this.buf, d]) : d;
    this.parse();
  }

  parse() {
    while (!this.busy && this.buf && this.buf.length) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end < 0) {
        if (this.buf.length > MAX_HEAD) this.fail(431, "Request Header Fields Too Large", "headers too large");
        return;
      }
      const head = this.buf.toString("latin1", 0, end);
      const lines = head.split("\r\n");
      const [method, target, version] = lines[0].split(" ");
      const headers = Object.create(null);
      for (let k = 1; k < lines.length; k++) {
        const c = lines[k].indexOf(":");
        if (c > 0) headers[lines[k].slice(0, c).trim().toLowerCase()] = lines[k].slice(c + 1).trim();
      }
      if (headers["transfer-encoding"]) return this.fail(411, "Length Required", "chunked request bodies are not supported");
      const len = Number(headers["content-length"] || 0);
      if (!(len >= 0) || len > MAX_BODY) return this.fail(413, "Content Too Large", "body too large");
      if (this.buf.length < end + 4 + len) return; // wait for the rest of the body
      const body = this.buf.subarray(end + 4, end + 4 + len);
      const rest = this.buf.subarray(end + 4 + len);
      this.buf = rest.length ? rest : null;
      const conn = (headers["connection"] || "").toLowerCase();
      this.keepAlive = version === "HTTP/1.1" ? conn !== "close" : conn === "keep-alive";
      this.busy = true;
      this.handle(method, target.split("?", 1)[0], headers, body);
    }
  }

  fail(status, reason, message) {
    this.keepAlive = false;
    this.busy = true;
    this.buf = null;
    this.sock.end(errorResponse(status, reason, message, false));
  }

  send(buf) {
    this.sock.write(buf);
    this.responseDone();
  }

  responseDone() {
    this.stream = null;
    this.busy = false;
    if (!this.keepAlive) {
      this.sock.end();
      return;
    }
    if (this.buf) this.parse();
  }

  handle(method, path, headers, body) {
    counters.requests++;
    serial++;
    const ka = this.keepAlive;
    if (method === "GET" && path === "/health") {
      return this.send(plainResponse(200, "OK", "application/json", '{"status":"ok"}', ka));
    }
    if (method === "GET" && path === "/v1/models") {
      return this.send(plainResponse(200, "OK", "application/json",
        '{"object":"list","data":[{"id":"fake-model","object":"model","created":0,"owned_by":"bench"}]}', ka));
    }
    if (path !== "/v1/chat/completions" && path !== "/chat/completions") {
      return this.send(errorResponse(404, "Not Found", "no such route", ka));
    }
    if (method !== "POST") return this.send(errorResponse(405, "Method Not Allowed", "use POST", ka));
    let req;
    try {
      req = JSON.parse(body.toString("utf8"));
    } catch (e) {
      return this.send(errorResponse(400, "Bad Request", "body is not JSON", ka));
    }
    if (req === null || typeof req !== "object") return this.send(errorResponse(400, "Bad Request", "body must be an object", ka));
    const n = Number.isInteger(req.max_tokens) ? req.max_tokens
      : Number.isInteger(req.max_completion_tokens) ? req.max_completion_tokens : 16;
    const delayMs = Number(headers["x-fake-delay-ms"] || 0);
    const pad = Number(headers["x-fake-chunk-bytes"] || 0);
    if (!(n >= 0 && n <= MAX_TOKENS)) return this.send(errorResponse(400, "Bad Request", "max_tokens out of range", ka));
    if (!(delayMs >= 0 && delayMs <= MAX_DELAY_MS)) return this.send(errorResponse(400, "Bad Request", "bad X-Fake-Delay-Ms", ka));
    if (!(Number.isInteger(pad) && pad >= 0 && pad <= MAX_PAD)) return this.send(errorResponse(400, "Bad Request", "bad X-Fake-Chunk-Bytes", ka));
    const model = typeof req.model === "string" ? req.model : "fake-model";
    if (req.stream !== true) {
      // The same question gets the same answer: bodies are cached (the id and
      // `created` stay those of the first answer), which keeps the fake cheap.
      const key = `${n}/${pad}/${ka ? 1 : 0}/${model}`;
      let resp = plainCache.get(key);
      if (resp === undefined) {
        resp = plainResponse(200, "OK", "application/json", chatCompletion(model, n, pad), ka);
        if (plainCache.size >= 64) plainCache.clear();
        if (resp.length <= 1 << 20) plainCache.set(key, resp);
      }
      return this.send(resp);
    }
    counters.streams++;
    const job = {
      n, delayMs, pad, model,
      stamp: headers["x-fake-stamp"] !== undefined,
      includeUsage: !!(req.stream_options && req.stream_options.include_usage === true),
    };
    this.stream = new Stream(this, job);
    this.stream.start();
  }
}

const server = net.createServer({ noDelay: true }, (sock) => new Conn(sock));
server.maxConnections = 20000;
server.listen({ port: opts.port, host: opts.host, backlog: 4096 }, () => {
  const port = server.address().port;
  if (opts.portFile) {
    fs.writeFileSync(opts.portFile + ".tmp", String(port));
    fs.renameSync(opts.portFile + ".tmp", opts.portFile);
  }
  if (!opts.quiet) process.stdout.write(`fake_backend listening on http://${opts.host}:${port}\n`);
});

function stop() {
  if (!opts.quiet) process.stdout.write(`fake_backend: ${JSON.stringify(counters)}\n`);
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
