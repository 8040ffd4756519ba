-- wrk script for the aiolb benchmarks.
--
-- WRK_BODY_BYTES=N (environment) turns every request into a POST with an N-byte body;
-- wrk.format() then adds the matching Content-Length header.
-- At the end, prints one line "WRK_JSON {...}" with request count, duration, bytes,
-- errors and latency percentiles in microseconds, for bench.py to parse.

local body_bytes = tonumber(os.getenv("WRK_BODY_BYTES") or "0") or 0
if body_bytes > 0 then
   wrk.method = "POST"
   wrk.body = string.rep("x", body_bytes)
   wrk.headers["Content-Type"] = "application/octet-stream"
end

local function us(value)
   return math.floor(value + 0.5)
end

done = function(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      us(latency:percentile(50)), us(latency:percentile(90)), us(latency:percentile(99)),
      us(latency.max), latency.mean))
end
