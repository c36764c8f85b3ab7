-- GCRA (generic cell rate algorithm) for one fleet rate limit key, in one
-- atomic step: every gateway of the fleet shares the key's theoretical
-- arrival time (TAT), kept with the server's clock (TIME), so gateways
-- with skewed clocks still agree.
--
-- KEYS[1]  the key (hash-tagged by the gateway: one key, one slot)
-- ARGV[1]  emission interval T in microseconds (the rate's period / count)
-- ARGV[2]  burst B: cells that may pass at once
-- Returns {allowed (1 or 0), remaining cells, retry after (us), reset (us)}.
local t = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local tau = t * burst
local new_tat = tat + t
local ahead = new_tat - now
if ahead > tau then
  return {0, 0, ahead - tau, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000))
return {1, math.floor((tau - ahead) / t), 0, ahead}
