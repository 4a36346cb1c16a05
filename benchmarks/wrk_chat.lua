-- wrk script for Jano's benchmarks: non-streamed chat completions, checked and timed.
--
-- Environment:
--   BENCH_TOKENS     max_tokens of each request (default 16)
--   BENCH_REQUESTS   stop after this many responses (default: run for wrk's -d)
--   BENCH_LAT_FILE   if set (use with -c 1), write one latency per line (microseconds)
--   BENCH_OUT        file the JSON summary is written to (default: stdout)
--   BENCH_DONE_FILE  created once BENCH_REQUESTS responses are in: wrk itself always
--                    waits out its -d, so the caller sends it SIGINT on seeing this file
--
-- With one connection every latency is exact: from the moment wrk asks for the
-- request to the parsed response.  wrk's own latency histogram is not used: it is
-- "corrected" for coordinated omission, which makes no sense for a closed loop.
-- Every response must be 200 and carry `"completion_tokens":<BENCH_TOKENS>`; the
-- others count as bad.  Needs wrk built with LuaJIT (Debian's is), for the FFI clock.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local tokens = tonumber(os.getenv("BENCH_TOKENS") or "16")
local limit = tonumber(os.getenv("BENCH_REQUESTS") or "0")
local lat_file = os.getenv("BENCH_LAT_FILE")
local expect = '"completion_tokens":' .. tokens .. ','

wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Say hi"}],"max_tokens":'
  .. tokens .. '}'

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
responses = 0
bad = 0
first_us = 0
last_us = 0
lat = {}
local sent_at = 0
local req = nil

function init(args)
  req = wrk.format()
end

function request()
  sent_at = now_us()
  if first_us == 0 then first_us = sent_at end
  return req
end

function response(status, headers, body)
  local t = now_us()
  last_us = t
  responses = responses + 1
  if status ~= 200 or not string.find(body, expect, 1, true) then
    bad = bad + 1
  end
  if lat_file then
    lat[#lat + 1] = t - sent_at
  end
  if limit > 0 and responses == limit then
    wrk.thread:stop()
    local path = os.getenv("BENCH_DONE_FILE")
    if path then local f = io.open(path, "w"); f:write("done\n"); f:close() end
  end
end

function done(summary, latency, requests)
  local n, b, first, last = 0, 0, nil, 0
  local f = nil
  if lat_file then f = io.open(lat_file, "w") end
  for _, th in ipairs(threads) do
    n = n + th:get("responses")
    b = b + th:get("bad")
    local fu, lu = th:get("first_us"), th:get("last_us")
    if fu > 0 and (first == nil or fu < first) then first = fu end
    if lu > last then last = lu end
    if f then
      local l = th:get("lat")
      for i = 1, #l do f:write(string.format("%.1f\n", l[i])) end
    end
  end
  if f then f:close() end
  local e = summary.errors
  local out = string.format(
    '{"responses":%d,"bad":%d,"window_us":%.1f,"wrk_requests":%d,"wrk_duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}',
    n, b, first and (last - first) or 0, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout)
  local path = os.getenv("BENCH_OUT")
  if path then
    local o = io.open(path, "w"); o:write(out .. "\n"); o:close()
  else
    io.write(out .. "\n")
  end
end
