-- wrk script for bench/replicated-ack: checkouts sent straight to the
-- order core (no gateway: the user is the `x-user-id` header the gateway
-- would set), each by another user with a fresh Idempotency-Key. The first
-- argument is the SKU, the second a run tag (keeps users unique across
-- runs), the third the number of wrk threads. Statuses are printed as one
-- JSON line at the end.
--
--   wrk -t2 -c32 -d5s --latency -s bench/core_checkout.lua http://CORE/checkout -- sku run1 2

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  sku, tag = args[1] or "bench-sku", args[2] or "r"
  nthreads = tonumber(args[3] or "1")
  i = tid
  body = '{"sku":"' .. sku .. '","qty":1}'
  created, other = 0, 0
end

function request()
  local user = tag .. "u" .. i
  i = i + nthreads
  return wrk.format("POST", nil, {
    ["x-user-id"] = user,
    ["idempotency-key"] = "k",
    ["content-type"] = "application/json",
  }, body)
end

function response(status, headers, body)
  if status == 201 then created = created + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("other")
  end
  io.write('{"created":' .. c .. ',"other":' .. o .. '}\n')
end
