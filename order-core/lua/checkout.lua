-- The local transaction of one checkout, atomic on the SKU's hash slot.
-- All keys share the hash tag {sku}, so this runs unchanged on Redis Cluster.
--
-- KEYS[1] fg:{sku}:stock        units for sale
-- KEYS[2] fg:{sku}:orders       live orders
-- KEYS[3] fg:{sku}:idem:<user>:<key>   -> order id
-- KEYS[4] fg:{sku}:user:<user>  units this user holds
-- KEYS[5] fg:{sku}:order:<id>   the order record (hash)
-- KEYS[6] fg:{sku}:txn:<txn>    -> order id, or "!fenced" after a rollback
-- KEYS[7] fg:{sku}:pending      zset of pending order ids by deadline
-- ARGV: order_id, sku, user, qty, per_user_limit, txn, now_ms, expires_ms, idem_key,
--       touch_replay ("1" under replicated acks: see the REPLAY branch)
--
-- Returns {"CREATED"} | {"REPLAY", order_id} | {"SOLDOUT"} | {"LIMIT"} | {"FENCED"}.
-- Checks run before any write, so a refusal changes nothing. A second run of
-- the same command (a retry after a lost reply or a failover) finds its own
-- idempotency key and answers REPLAY with its own order id: never deducts twice.

local txn = redis.call('GET', KEYS[6])
if txn == '!fenced' then
  -- The broker's check-back rolled this transaction back: its message will
  -- never be delivered, so it must never create an order.
  return {'FENCED'}
end
local existing = redis.call('GET', KEYS[3])
if existing then
  if ARGV[10] == '1' then
    -- Write the key again (same value): this moves the caller's replication
    -- offset past the replayed order's writes, so the WAIT behind this
    -- script confirms that order is on a replica before it is answered.
    redis.call('SET', KEYS[3], existing)
  end
  return {'REPLAY', existing}
end
local qty = tonumber(ARGV[4])
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
if stock < qty then
  return {'SOLDOUT'}
end
local held = tonumber(redis.call('GET', KEYS[4]) or '0')
if held + qty > tonumber(ARGV[5]) then
  return {'LIMIT'}
end
redis.call('DECRBY', KEYS[1], qty)
redis.call('INCR', KEYS[2])
redis.call('INCRBY', KEYS[4], qty)
redis.call('SET', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[5],
  'id', ARGV[1], 'sku', ARGV[2], 'user', ARGV[3], 'qty', ARGV[4],
  'status', 'pending', 'txn', ARGV[6], 'idem', ARGV[9],
  'created_ms', ARGV[7], 'expires_ms', ARGV[8])
redis.call('SET', KEYS[6], ARGV[1])
redis.call('ZADD', KEYS[7], ARGV[8], ARGV[1])
return {'CREATED'}
