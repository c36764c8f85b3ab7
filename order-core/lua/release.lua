-- Cancels an unpaid order and returns its stock, exactly once: only a
-- pending order changes, and it stops being pending in the same step.
--
-- KEYS[1] fg:{sku}:order:<id>
-- KEYS[2] fg:{sku}:stock
-- KEYS[3] fg:{sku}:orders
-- KEYS[4] fg:{sku}:user:<user>
-- KEYS[5] fg:{sku}:pending
-- ARGV: order_id, now_ms, force ("1" ignores the deadline)
-- Returns 1 when stock went back, 0 when there was nothing to do.

local o = redis.call('HMGET', KEYS[1], 'status', 'qty', 'expires_ms')
if o[1] ~= 'pending' then
  return 0
end
if ARGV[3] ~= '1' and tonumber(o[3]) > tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'cancelled')
redis.call('INCRBY', KEYS[2], o[2])
redis.call('DECR', KEYS[3])
local held = tonumber(redis.call('GET', KEYS[4]) or '0') - tonumber(o[2])
if held < 0 then held = 0 end
redis.call('SET', KEYS[4], held)
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
