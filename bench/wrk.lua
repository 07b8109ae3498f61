-- wrk script for bench/native_bench.py.
-- BENCH_BODY_BYTES > 0: POST that many bytes (application/octet-stream); otherwise GET.
-- The request is built once by wrk (no request() function), so the script costs nothing
-- per request. done() prints one line the harness parses:
--   NATIVE_BENCH {json}
-- latency values are microseconds; err_status counts responses with status >= 400 (wrk's
-- own rule), err_connect/read/write/timeout are socket errors.

local body_bytes = tonumber(os.getenv("BENCH_BODY_BYTES") or "0") or 0
if body_bytes > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", body_bytes)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'NATIVE_BENCH {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, '
      .. '"err_timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
      .. '"p999_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
