-- Confirms a pending order (the payment callback). A cancelled or already
-- paid order is left as it is.
--
-- KEYS[1] fg:{sku}:order:<id>
-- KEYS[2] fg:{sku}:pending
-- ARGV: order_id
-- Returns the status after the call, or false when there is no such order.

local st = redis.call('HGET', KEYS[1], 'status')
if not st then
  return false
end
if st == 'pending' then
  redis.call('HSET', KEYS[1], 'status', 'paid')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 'paid'
end
return st
