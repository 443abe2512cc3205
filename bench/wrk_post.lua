-- wrk script: POST one reading per request to /v1/telemetry and count what
-- was sent and answered per thread, so a test can hold the spool to exact
-- bounds (wrk's own totals leave out requests in flight at the end).
-- READINGS (env) readings per request, default 1.
local readings = tonumber(os.getenv("READINGS") or "1")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  sent, answered, accepted, non2xx = 0, 0, 0, 0
  local one = '{"device_id":"wrk-%d","temperature":21.5,"battery_mv":3600,"location":"sh/fa"}'
  local items = {}
  for i = 1, readings do items[i] = string.format(one, i) end
  local body = "[" .. table.concat(items, ",") .. "]"
  req = wrk.format("POST", "/v1/telemetry", {["Content-Type"] = "application/json"}, body)
end

function request()
  sent = sent + 1
  return req
end

function response(status, headers, body)
  answered = answered + 1
  if status == 202 then
    accepted = accepted + readings
  else
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local s, a, acc, bad = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent")
    a = a + t:get("answered")
    acc = acc + t:get("accepted")
    bad = bad + t:get("non2xx")
  end
  io.write(string.format("WRK_COUNTS sent=%d answered=%d accepted=%d non2xx=%d readings=%d\n", s, a, acc, bad, readings))
  io.write(string.format("WRK_LATENCY_US p50=%d p90=%d p99=%d p999=%d max=%d\n", latency:percentile(50),
                         latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
