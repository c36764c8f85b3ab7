-- The broker's check-back for one transaction id, atomic on the SKU's slot.
--
-- KEYS[1] fg:{sku}:txn:<txn>
-- Returns "COMMIT" when the checkout created its order. Otherwise it writes
-- the fence in the same step and returns "ROLLBACK": checkout.lua refuses a
-- fenced transaction id, so a producer that is merely slow can never create
-- an order after its message was rolled back.

local v = redis.call('GET', KEYS[1])
if v and v ~= '!fenced' then
  return 'COMMIT'
end
redis.call('SET', KEYS[1], '!fenced')
return 'ROLLBACK'
