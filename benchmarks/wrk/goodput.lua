-- wrk script for benchmarks/goodput.py: POSTs one body in a closed loop and records, per status, how many
-- answers came and the latency of the 200s, which wrk's own summary (every answer together) cannot give.
--
--   GOODPUT_BODY=body.bin GOODPUT_CONTENT_TYPE='multipart/form-data; boundary=...' GOODPUT_OUT=out.json \
--     wrk -t 64 -c 64 -d 20s -s benchmarks/wrk/goodput.lua http://127.0.0.1:3000/classify
--
-- GOODPUT_HEADERS (optional) adds headers, "Name: value|Name2: value2", for requests that need more than a
-- Content-Type, such as the Open Inference Protocol's Inference-Header-Content-Length (protocols_load.py).
--
-- One connection per wrk thread (-t equal to -c): request() and response() then alternate in each thread,
-- so the time between them is that request's latency (wrk's Lua API names no connection). The clock is
-- clock_gettime(CLOCK_MONOTONIC) through LuaJIT's ffi.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } goodput_timespec;
int clock_gettime(int clk_id, goodput_timespec *tp);
]]
local ts = ffi.new("goodput_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(os.getenv("GOODPUT_BODY"), "rb"))
  local body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = os.getenv("GOODPUT_CONTENT_TYPE") or "application/octet-stream"
  local key = os.getenv("GOODPUT_API_KEY")
  if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
  for pair in string.gmatch(os.getenv("GOODPUT_HEADERS") or "", "[^|]+") do
    local name, value = string.match(pair, "^%s*([^:]-)%s*:%s*(.-)%s*$")
    assert(name and name ~= "", "GOODPUT_HEADERS: expected 'Name: value', got '" .. pair .. "'")
    wrk.headers[name] = value
  end
  req = wrk.format()
  statuses = {}
  ok_ms = {}   -- latency of each 200, in ms (one thread's answers)
  started = 0
end

function request()
  started = now_ms()
  return req
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status == 200 then ok_ms[#ok_ms + 1] = now_ms() - started end
end

function done(summary, latency, requests)
  local out = assert(io.open(os.getenv("GOODPUT_OUT"), "w"))
  out:write('{"duration_us": ', summary.duration, ', "socket_errors": {"connect": ', summary.errors.connect,
            ', "read": ', summary.errors.read, ', "write": ', summary.errors.write, ', "timeout": ',
            summary.errors.timeout, '}, "threads": [')
  for i, thread in ipairs(threads) do
    local s, l = thread:get("statuses"), thread:get("ok_ms")
    out:write(i > 1 and "," or "", '{"statuses": {')
    local first = true
    for k, v in pairs(s) do
      out:write(first and "" or ",", '"', k, '": ', v)
      first = false
    end
    out:write('}, "ok_ms": [')
    for j, v in ipairs(l) do out:write(j > 1 and "," or "", string.format("%.2f", v)) end
    out:write(']}')
  end
  out:write(']}\n')
  out:close()
end
