-- wrk script for the flash-sale benchmark (bench/flash-sale runs it).
--
-- Every request is a checkout by another user with a fresh Idempotency-Key:
-- user tokens (JWTs signed by the runner) are read from the file named by
-- the first script argument, one per line, and each wrk thread takes every
-- n-th token. The second argument is the SKU, the third the number of wrk
-- threads (each thread walks its own residue class of tokens and keys). Statuses are counted per
-- thread and printed as one JSON line at the end, so the runner can check
-- that exactly the stock was sold (no oversell) and nothing failed.
--
--   wrk -t2 -c64 -d10s -s bench/flash_sale.lua http://GW/checkout -- tokens.txt bench-sku 2

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path, sku = args[1], args[2] or "bench-sku"
  tokens = {}
  for line in io.lines(path) do
    tokens[#tokens + 1] = line
  end
  nthreads = tonumber(args[3] or "1")
  i = tid
  body = '{"sku":"' .. sku .. '","qty":1}'
  created, replay, soldout, limited, other = 0, 0, 0, 0, 0
  other_status = 0
end

function request()
  local t = tokens[(i % #tokens) + 1]
  local key = "k" .. i
  i = i + nthreads
  return wrk.format("POST", nil, {
    ["authorization"] = "Bearer " .. t,
    ["idempotency-key"] = key,
    ["content-type"] = "application/json",
  }, body)
end

function response(status, headers, body)
  if status == 201 then created = created + 1
  elseif status == 200 then replay = replay + 1
  elseif status == 409 then soldout = soldout + 1
  elseif status == 429 then limited = limited + 1
  else other = other + 1; other_status = status end
end

function done(summary, latency, requests)
  local c, r, s, l, o, os = 0, 0, 0, 0, 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created"); r = r + t:get("replay"); s = s + t:get("soldout")
    l = l + t:get("limited"); o = o + t:get("other")
    if t:get("other_status") ~= 0 then os = t:get("other_status") end
  end
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%d,"created":%d,"replay":%d,"sold_out":%d,"over_limit":%d,"other":%d,"other_status":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    c, r, s, l, o, os,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
